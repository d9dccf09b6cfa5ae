//! Lookups (SPEC §4.5): the attribution of a phone number or BSUID, and one conversation.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::attribution::{AutomaticEvent, Click, ClickVia, Conversation};
use crate::auth::Caller;
use crate::domain::phone::PhoneDigits;
use crate::error::{ApiError, Code};
use crate::routes::rfc3339;
use crate::startup::AppState;
use crate::store::UserRecord;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    wa_id: Option<String>,
    bsuid: Option<String>,
    name: Option<String>,
}

impl From<&UserRecord> for UserView {
    fn from(user: &UserRecord) -> Self {
        Self {
            wa_id: user.wa_id.clone(),
            bsuid: user.bsuid.clone(),
            name: user.name.clone(),
        }
    }
}

fn via_name(via: ClickVia) -> &'static str {
    match via {
        ClickVia::Referral => "referral",
        ClickVia::AutomaticEvent => "automatic_event",
    }
}

fn click_view(click: &Click) -> serde_json::Value {
    json!({
        "ctwaClid": click.ctwa_clid,
        "sourceId": click.source_id,
        "sourceType": click.source_type,
        "sourceUrl": click.source_url,
        "headline": click.headline,
        "body": click.body,
        "mediaType": click.media_type,
        "imageUrl": click.image_url,
        "videoUrl": click.video_url,
        "thumbnailUrl": click.thumbnail_url,
        "welcomeMessage": click.welcome_message,
        "messageId": click.message_id,
        "clickedAt": rfc3339(click.clicked_at),
        "capturedAt": rfc3339(click.captured_at),
        "via": via_name(click.via),
    })
}

fn automatic_event_view(event: &AutomaticEvent) -> serde_json::Value {
    json!({
        "messageId": event.message_id,
        "eventName": event.event_name,
        "timestamp": rfc3339(event.timestamp),
        "ctwaClid": event.ctwa_clid,
        "value": event.value,
        "currency": event.currency,
        "capturedAt": rfc3339(event.captured_at),
    })
}

/// A conversation in Zernio's shape: the attribution as `metadata.ctwa_*`, absent values `null`.
pub fn conversation_view(
    conversation: &Conversation,
    user: Option<&UserRecord>,
) -> serde_json::Value {
    let attribution = conversation.attribution();
    let field = |read: fn(&Click) -> Option<String>| attribution.and_then(read);
    json!({
        "id": conversation.id,
        "accountId": conversation.account_id,
        "user": user.map(UserView::from),
        "startedAt": rfc3339(conversation.started_at),
        "lastInboundAt": rfc3339(conversation.last_inbound_at),
        "messageCount": conversation.message_count,
        "metadata": {
            "ctwa_clid": field(|c| c.ctwa_clid.clone()),
            "ctwa_source_id": field(|c| c.source_id.clone()),
            "ctwa_source_type": field(|c| c.source_type.clone()),
            "ctwa_source_url": field(|c| c.source_url.clone()),
            "ctwa_headline": field(|c| c.headline.clone()),
            "ctwa_body": field(|c| c.body.clone()),
            "ctwa_media_type": field(|c| c.media_type.clone()),
            "ctwa_image_url": field(|c| c.image_url.clone()),
            "ctwa_video_url": field(|c| c.video_url.clone()),
            "ctwa_thumbnail_url": field(|c| c.thumbnail_url.clone()),
            "ctwa_welcome_message": field(|c| c.welcome_message.clone()),
            "ctwa_clicked_at": attribution.map(|c| rfc3339(c.clicked_at)),
            "ctwa_captured_at": attribution.map(|c| rfc3339(c.captured_at)),
            "ctwa_message_id": field(|c| Some(c.message_id.clone())),
            "ctwa_via": attribution.map(|c| via_name(c.via)),
        },
        "clicks": conversation.clicks.iter().map(click_view).collect::<Vec<_>>(),
        "automaticEvents": conversation.automatic_events.iter().map(automatic_event_view).collect::<Vec<_>>(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttributionQuery {
    phone: Option<String>,
    bsuid: Option<String>,
    account_id: Option<String>,
}

pub async fn attribution(
    state: web::Data<AppState>,
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
    let results = state
        .store
        .users_with_conversations(
            phone.as_ref().map(|phone| phone.as_str().to_string()),
            bsuid.clone(),
            move |account_id| {
                scope.can_see(account_id)
                    && only_account
                        .as_deref()
                        .is_none_or(|only| only == account_id)
            },
        )
        .await?;
    let mut rendered = Vec::with_capacity(results.len());
    for (user, conversations) in &results {
        let mut views = Vec::with_capacity(conversations.len());
        for conversation in conversations {
            let mut view = conversation_view(conversation, Some(user));
            view["recentConversions"] =
                crate::routes::conversions::recent_for_conversation(&state, &conversation.id)
                    .await?;
            views.push(view);
        }
        rendered.push(json!({
            "accountId": user.account_id,
            "user": UserView::from(user),
            "conversations": views,
        }));
    }
    Ok(HttpResponse::Ok().json(json!({
        "phone": phone.as_ref().map(PhoneDigits::as_str),
        "bsuid": bsuid,
        "results": rendered,
    })))
}

pub async fn conversation(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let not_found = || ApiError::new(Code::ConversationNotFound);
    let Some(conversation) = state.store.conversation(id).await? else {
        return Err(not_found());
    };
    if !caller.can_see(&conversation.account_id) {
        return Err(not_found());
    }
    let user = state
        .store
        .user(
            conversation.account_id.clone(),
            conversation.user_key.clone(),
        )
        .await?;
    let mut view = conversation_view(&conversation, user.as_ref());
    view["recentConversions"] =
        crate::routes::conversions::recent_for_conversation(&state, &conversation.id).await?;
    Ok(HttpResponse::Ok().json(view))
}
