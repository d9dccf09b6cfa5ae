//! `POST /v1/whatsapp/conversions` (Zernio-compatible), its history, and dataset provisioning.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::attribution::Conversation;
use crate::auth::Caller;
use crate::conversions::payload::{events_request_body, MetaEvent};
use crate::conversions::request::{validate, ConversionBody, Lookup};
use crate::conversions::{record_and_deliver, result_body};
use crate::domain::conversion::Currency;
use crate::error::{ApiError, Code};
use crate::json_body::JsonBody;
use crate::routes::rfc3339;
use crate::startup::AppState;
use crate::store::{ConversionRecord, ConversionSource, NewConversion};

/// Finds the conversation and its click id, or says why there is nothing to attribute.
async fn attributed_conversation(
    state: &AppState,
    account_id: &str,
    lookup: &Lookup,
) -> Result<(Conversation, String, i64), ApiError> {
    let conversation = match lookup {
        Lookup::Conversation(id) => match state.store.conversation(id.clone()).await? {
            Some(conversation) if conversation.account_id == account_id => conversation,
            _ => {
                return Err(ApiError::new(Code::ConversationNotFound)
                    .message(format!("no conversation {id:?} on account {account_id:?}")))
            }
        },
        Lookup::Phone(phone) => {
            match state
                .store
                .most_recent_attributed_conversation(account_id.to_string(), phone.as_str().to_string())
                .await?
            {
                (_, Some(conversation)) => conversation,
                (true, None) => {
                    return Err(ApiError::new(Code::NoCtwaClid).message(
                        "none of this phone's conversations on the account came from a Click-to-WhatsApp ad click with a click id (organic chats, or Status-placement ads, which carry no ctwa_clid)",
                    ))
                }
                (false, None) => {
                    return Err(ApiError::new(Code::ConversationNotFound)
                        .message("this phone has no conversation on the account"))
                }
            }
        }
    };
    if let Some(click) = conversation.ctwa_attribution() {
        let ctwa_clid = click
            .ctwa_clid
            .clone()
            .expect("a click-id attribution has one");
        let clicked_at = click.clicked_at;
        return Ok((conversation, ctwa_clid, clicked_at));
    }
    let reason = match conversation.attribution() {
        Some(_) => "the conversation came from a Status-placement ad, which carries no ctwa_clid, so Meta cannot attribute a conversion to it",
        None => "the conversation started without an ad click (an organic chat), so there is no ctwa_clid to attribute a conversion to",
    };
    Err(ApiError::new(Code::NoCtwaClid).message(reason))
}

pub async fn send(
    state: web::Data<AppState>,
    caller: Caller,
    body: JsonBody<ConversionBody>,
) -> Result<HttpResponse, ApiError> {
    let request = validate(
        body.into_inner(),
        &state.settings.event_names,
        state.clock.now_secs(),
    )?;
    let account = caller.account(&request.account_id)?;
    let (conversation, ctwa_clid, clicked_at) =
        attributed_conversation(&state, &account.id, &request.lookup).await?;
    let Some(dataset_id) = account.metadata.meta_capi_dataset_id.clone() else {
        return Err(ApiError::new(Code::DatasetNotConfigured));
    };
    let mut warnings = Vec::new();
    if request.event_time - clicked_at > state.settings.attribution_window_secs() {
        warnings.push("outside_attribution_window".to_string());
    }
    let meta_body = events_request_body(
        &MetaEvent {
            event_name: request.event_name.as_str(),
            event_time: request.event_time,
            event_id: request.event_id.as_str(),
            ctwa_clid: &ctwa_clid,
            waba_id: &account.waba_id,
            email_hash: request.email_hash.as_deref(),
            external_id_hash: request.external_id_hash.as_deref(),
            value: request.value,
            currency: request.currency.as_ref().map(Currency::as_str),
            content_ids: &request.content_ids,
            automatic_event: false,
        },
        request.test_code.as_deref(),
        state.settings.partner_agent.as_deref(),
    );
    if request.dry_run {
        return Ok(HttpResponse::Ok().json(json!({
            "platform": "metaads",
            "dryRun": true,
            "conversationId": conversation.id,
            "warnings": warnings,
            "request": {
                "method": "POST",
                "url": state.graph.events_url(&dataset_id),
                "headers": {"Authorization": "Bearer [REDACTED]", "Content-Type": "application/json"},
                "body": meta_body,
            },
        })));
    }
    let record = ConversionRecord::queued(
        NewConversion {
            account_id: account.id.clone(),
            event_name: request.event_name.as_str().to_string(),
            event_id: request.event_id.as_str().to_string(),
            conversation_id: conversation.id.clone(),
            event_time: request.event_time,
            source: ConversionSource::Api,
            dataset_id,
            request_body: meta_body,
            warnings,
        },
        state.clock.now().timestamp_millis(),
    );
    let delivered = record_and_deliver(&state, &account, record).await?;
    let (status, body) = result_body(&delivered.record, delivered.deduplicated);
    Ok(HttpResponse::build(status).json(body))
}

fn history_item(record: &ConversionRecord) -> Value {
    json!({
        "timestamp": rfc3339(record.created_at_ms / 1000),
        "eventName": record.event_name,
        "eventId": record.event_id,
        "eventTime": rfc3339(record.event_time),
        "conversationId": record.conversation_id,
        "source": match record.source {
            ConversionSource::Api => "api",
            ConversionSource::AutomaticEvent => "automatic_event",
        },
        "status": record.status.as_str(),
        "eventsReceived": record.events_received,
        "eventsFailed": record.events_failed,
        "traceId": record.trace_id,
        "durationMs": record.duration_ms,
        "attempts": record.attempts,
        "possibleDuplicate": record.possible_duplicate,
        "error": record.error.as_ref().map(|error| error.message.clone()),
        "errorCode": record.error.as_ref().map(|error| error.code.clone()),
    })
}

/// The latest conversions of a conversation, for lookups.
pub async fn recent_for_conversation(
    state: &AppState,
    conversation_id: &str,
) -> Result<Value, ApiError> {
    let records = state
        .store
        .conversions_of_conversation(conversation_id.to_string(), 10)
        .await?;
    Ok(Value::Array(records.iter().map(history_item).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryQuery {
    account_id: Option<String>,
    limit: Option<i64>,
}

pub async fn history(
    state: web::Data<AppState>,
    caller: Caller,
    query: web::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let Some(account_id) = query.account_id else {
        return Err(ApiError::new(Code::MissingAccountId));
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::new(Code::InvalidLimit));
    }
    let account = caller.account(&account_id)?;
    let records = state
        .store
        .conversion_history(account.id, limit as usize)
        .await?;
    Ok(HttpResponse::Ok()
        .json(json!({ "events": records.iter().map(history_item).collect::<Vec<_>>() })))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetQuery {
    account_id: Option<String>,
}

pub async fn get_dataset(
    state: web::Data<AppState>,
    caller: Caller,
    query: web::Query<DatasetQuery>,
) -> Result<HttpResponse, ApiError> {
    let Some(account_id) = query.into_inner().account_id else {
        return Err(ApiError::new(Code::MissingAccountId));
    };
    let account = caller.account(&account_id)?;
    Ok(HttpResponse::Ok().json(json!({ "datasetId": account.metadata.meta_capi_dataset_id })))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetBody {
    account_id: String,
}

fn meta_failure(error: crate::graph::GraphError) -> ApiError {
    ApiError::new(Code::MetaError)
        .message(format!(
            "Meta refused the dataset request. {}",
            error.actionable_message()
        ))
        .with_details(json!({
            "metaCode": error.meta_code(),
            "metaSubcode": error.meta_subcode(),
            "traceId": error.trace_id(),
        }))
}

/// Reads the WABA's dataset from Meta and creates one when there is none; stores it on the
/// account. Safe to repeat.
pub async fn provision_dataset(
    state: web::Data<AppState>,
    caller: Caller,
    body: JsonBody<DatasetBody>,
) -> Result<HttpResponse, ApiError> {
    let mut account = caller.account(&body.account_id)?;
    let existing = state
        .graph
        .get_dataset(&account.waba_id, &account.access_token)
        .await
        .map_err(meta_failure)?;
    let (dataset_id, created) = match existing {
        Some(dataset_id) => (dataset_id, false),
        None => (
            state
                .graph
                .create_dataset(&account.waba_id, &account.access_token)
                .await
                .map_err(meta_failure)?,
            true,
        ),
    };
    if account.metadata.meta_capi_dataset_id.as_ref() != Some(&dataset_id) {
        account.metadata.meta_capi_dataset_id = Some(dataset_id.clone());
        account.updated_at = state.clock.now_secs();
        state.store.update_account(account).await?;
    }
    Ok(HttpResponse::Ok().json(json!({ "datasetId": dataset_id, "created": created })))
}
