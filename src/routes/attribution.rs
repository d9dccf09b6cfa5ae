//! Lookups (SPEC §4.5): the attribution of a phone number or BSUID, and one conversation.

use actix_web::{web, HttpResponse};

use crate::api::attribution::{
    AttributionAnswer, AttributionQuery, AttributionResult, ConversationView, UserView,
};
use crate::api::conversions::HistoryItem;
use crate::api::errors::ErrorBody;
use crate::auth::Caller;
use crate::conversions;
use crate::domain::phone::PhoneDigits;
use crate::error::{ApiError, Code};
use crate::store::Store;

/// The latest conversions of a conversation, as the lookups show them.
async fn recent_conversions(
    conversions: &conversions::Service,
    conversation_id: &str,
) -> Result<Vec<HistoryItem>, ApiError> {
    let records = conversions.recent_for_conversation(conversation_id).await?;
    Ok(records.iter().map(HistoryItem::from).collect())
}

#[utoipa::path(
    get,
    path = "/v1/whatsapp/attribution",
    tag = "attribution",
    security(("bearer" = [])),
    params(AttributionQuery),
    responses(
        (status = 200, description = "Every matching user and conversation visible to the key; conversations newest first.", body = AttributionAnswer),
        (status = 404, description = "`accountId` names no account visible to the key (`account_not_found`).", body = ErrorBody),
    ),
)]
pub async fn attribution(
    store: web::Data<Store>,
    conversions: web::Data<conversions::Service>,
    caller: Caller,
    query: web::Query<AttributionQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let phone = query
        .phone
        .as_deref()
        .map(PhoneDigits::parse)
        .transpose()
        .map_err(|message| {
            ApiError::new(Code::InvalidPhone).message(format!("phone: {message}"))
        })?;
    let bsuid = query.bsuid.filter(|bsuid| !bsuid.trim().is_empty());
    if phone.is_none() && bsuid.is_none() {
        return Err(ApiError::new(Code::MissingPhone));
    }
    if let Some(account_id) = &query.account_id {
        caller.account(account_id)?;
    }
    let only_account = query.account_id.clone();
    let scope = caller.clone();
    let results = store
        .users_with_conversations(
            phone.as_ref().map(|phone| phone.as_str().to_string()),
            bsuid.clone(),
            Box::new(move |account_id| {
                scope.can_see(account_id)
                    && only_account
                        .as_deref()
                        .is_none_or(|only| only == account_id)
            }),
        )
        .await?;
    let mut rendered = Vec::with_capacity(results.len());
    for (user, conversations) in &results {
        let mut views = Vec::with_capacity(conversations.len());
        for conversation in conversations {
            let recent = recent_conversions(&conversions, &conversation.id).await?;
            views.push(ConversationView::new(conversation, Some(user), recent));
        }
        rendered.push(AttributionResult {
            account_id: user.account_id().to_string(),
            user: UserView::from(user),
            conversations: views,
        });
    }
    Ok(HttpResponse::Ok().json(AttributionAnswer {
        phone: phone.as_ref().map(|phone| phone.as_str().to_string()),
        bsuid,
        results: rendered,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/whatsapp/conversations/{id}",
    tag = "attribution",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The conversation id.")),
    responses(
        (status = 200, description = "The conversation, its attribution, clicks and recent conversions.", body = ConversationView),
        (status = 404, description = "No such conversation visible to the key (`conversation_not_found`).", body = ErrorBody),
    ),
)]
pub async fn conversation(
    store: web::Data<Store>,
    conversions: web::Data<conversions::Service>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let not_found = || ApiError::new(Code::ConversationNotFound);
    let Some(conversation) = conversions.conversation(id).await? else {
        return Err(not_found());
    };
    if !caller.can_see(&conversation.account_id) {
        return Err(not_found());
    }
    let user = store
        .user(
            conversation.account_id.clone(),
            conversation.user_key.clone(),
        )
        .await?;
    let recent = recent_conversions(&conversions, &conversation.id).await?;
    Ok(HttpResponse::Ok().json(ConversationView::new(&conversation, user.as_ref(), recent)))
}
