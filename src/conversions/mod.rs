//! Conversions: delivery to Meta with bounded retries, outcomes, the outbox worker, and the
//! forwarding of Meta's automatic events.

pub mod outbox;
pub mod payload;
pub mod request;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::attribution::AutomaticEvent;
use crate::domain::account::Account;
use crate::domain::conversion::MAX_EVENT_AGE_SECS;
use crate::graph::{ErrorClass, EventsReceived, GraphError};
use crate::startup::AppState;
use crate::store::{
    ConversionFailure, ConversionRecord, ConversionSource, ConversionStatus, StoreError,
};

/// What one attempt to deliver led to.
pub enum Attempt {
    /// Meta took the event, or refused it for good: the record is final.
    Final,
    /// Worth trying again later; the record stays queued.
    Transient,
}

/// Applies the answer of one Graph call to a record (status, counts, error, trace id).
fn apply_answer(
    record: &mut ConversionRecord,
    answer: Result<EventsReceived, GraphError>,
    now_ms: i64,
) -> Attempt {
    record.attempts += 1;
    record.updated_at_ms = now_ms;
    match answer {
        Ok(received) if received.events_received >= 1 => {
            record.status = ConversionStatus::Sent;
            record.events_received = received.events_received;
            record.events_failed = 0;
            record.trace_id = received.fbtrace_id;
            record.error = None;
            record.next_attempt_at_ms = None;
            Attempt::Final
        }
        Ok(received) => {
            record.status = ConversionStatus::Failed;
            record.events_received = 0;
            record.events_failed = 1;
            record.trace_id = received.fbtrace_id;
            record.error = Some(ConversionFailure {
                code: "events_received_zero".into(),
                message: "Meta answered success but counted no event (events_received: 0); check the dataset and the event in Events Manager".into(),
                meta_code: None,
                meta_subcode: None,
            });
            record.next_attempt_at_ms = None;
            Attempt::Final
        }
        Err(error) => {
            record.trace_id = error.trace_id().or(record.trace_id.take());
            record.error = Some(ConversionFailure {
                code: error.code(),
                message: error.actionable_message(),
                meta_code: error.meta_code(),
                meta_subcode: error.meta_subcode(),
            });
            match error.class() {
                ErrorClass::Transient => Attempt::Transient,
                ErrorClass::Permanent => {
                    record.status = ConversionStatus::Failed;
                    record.events_received = 0;
                    record.events_failed = 1;
                    record.next_attempt_at_ms = None;
                    Attempt::Final
                }
            }
        }
    }
}

/// Marks a record expired: still undelivered once Meta would no longer accept it.
pub fn expire(record: &mut ConversionRecord, now_ms: i64) {
    record.status = ConversionStatus::Expired;
    record.updated_at_ms = now_ms;
    record.next_attempt_at_ms = None;
    record.events_failed = 1;
    record.error = Some(ConversionFailure {
        code: "expired".into(),
        message: "the event stayed undeliverable until it was older than the 7 days Meta accepts"
            .into(),
        meta_code: record.error.as_ref().and_then(|error| error.meta_code),
        meta_subcode: None,
    });
}

/// One Graph call for a recorded conversion, applied to the record. After a transient failure
/// the record is given its next outbox time, capped exponential from the base.
pub async fn attempt_once(
    state: &AppState,
    account: &Account,
    record: &mut ConversionRecord,
    timeout: Duration,
) -> Attempt {
    let answer = state
        .graph
        .send_events(
            &record.dataset_id,
            &account.access_token,
            &record.request_body,
            timeout,
        )
        .await;
    let attempt = apply_answer(record, answer, state.clock.now().timestamp_millis());
    if let Attempt::Transient = attempt {
        let factor = 2u32.saturating_pow(record.attempts.saturating_sub(1).min(20));
        let backoff = state
            .settings
            .outbox_backoff_base
            .saturating_mul(factor)
            .min(state.settings.outbox_backoff_max);
        record.next_attempt_at_ms = Some(record.updated_at_ms + backoff.as_millis() as i64);
    }
    attempt
}

/// Sends a just-recorded conversion, retrying transient failures within the request budget,
/// and stores the outcome durably. A conversion still failing when the budget runs out stays
/// queued for the outbox.
pub async fn deliver_in_request(
    state: &AppState,
    account: &Account,
    record: &mut ConversionRecord,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let deadline = started + state.settings.delivery_budget;
    let mut pause = Duration::from_millis(100);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = state
            .graph
            .timeout()
            .min(remaining)
            .max(Duration::from_millis(50));
        match attempt_once(state, account, record, timeout).await {
            Attempt::Final => break,
            // Out of budget: the outbox takes over at the time `attempt_once` set.
            Attempt::Transient if Instant::now() + pause >= deadline => break,
            Attempt::Transient => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
    record.duration_ms = started.elapsed().as_millis() as u64;
    state.store.save_conversion(record.clone()).await?;
    state.store.durable().await?;
    let meta_code = record.error.as_ref().and_then(|error| error.meta_code);
    state.metrics.conversion(record.status.as_str(), meta_code);
    if record.status == ConversionStatus::Queued {
        state.outbox_wakeup.notify_one();
    }
    Ok(())
}

/// The answer to a conversion request (Zernio's fields first), and its HTTP status.
pub fn result_body(
    record: &ConversionRecord,
    deduplicated: bool,
) -> (actix_web::http::StatusCode, Value) {
    let failures: Vec<Value> = match (&record.status, &record.error) {
        (ConversionStatus::Failed | ConversionStatus::Expired, Some(error)) => vec![json!({
            "eventIndex": 0,
            "eventId": record.event_id,
            "message": error.message,
            "code": error.code,
            "subcode": error.meta_subcode,
        })],
        _ => Vec::new(),
    };
    let mut body = json!({
        "platform": "metaads",
        "eventsReceived": record.events_received,
        "eventsFailed": record.events_failed,
        "failures": failures,
        "traceId": record.trace_id,
        "status": record.status.as_str(),
        "conversationId": record.conversation_id,
        "warnings": record.warnings,
    });
    let status = match record.status {
        ConversionStatus::Queued => {
            body["queued"] = json!(true);
            if let Some(error) = &record.error {
                body["lastError"] = json!({"code": error.code, "message": error.message});
            }
            actix_web::http::StatusCode::ACCEPTED
        }
        _ => actix_web::http::StatusCode::OK,
    };
    if deduplicated {
        body["deduplicated"] = json!(true);
    }
    (status, body)
}

/// Queues Meta's automatic events as conversions for accounts that opted in. They go through
/// the outbox, so the webhook path never waits for Meta.
pub async fn forward_automatic_events(
    state: &AppState,
    matched: Vec<(String, String, AutomaticEvent)>,
) -> Result<(), StoreError> {
    let mut queued = false;
    for (account_id, conversation_id, event) in matched {
        let Some(account) = state.store.account(&account_id) else {
            continue;
        };
        if !account.forward_automatic_events {
            continue;
        }
        let skip = |reason: &str| {
            tracing::info!(account_id, message_id = %event.message_id, event_name = %event.event_name, reason, "automatic event not forwarded");
        };
        let Some(dataset_id) = account.metadata.meta_capi_dataset_id.clone() else {
            skip("the account has no dataset");
            continue;
        };
        if !state.settings.event_names.contains(&event.event_name) {
            skip("the event name is not in the allowlist");
            continue;
        }
        let now = state.clock.now();
        if now.timestamp() - event.timestamp > MAX_EVENT_AGE_SECS {
            skip("the event is older than 7 days");
            continue;
        }
        let Some(conversation) = state.store.conversation(conversation_id.clone()).await? else {
            continue;
        };
        let Some(ctwa_clid) = conversation
            .ctwa_attribution()
            .and_then(|click| click.ctwa_clid.clone())
        else {
            skip("the conversation has no click id");
            continue;
        };
        let event_id = format!("auto:{}:{}", event.message_id, event.event_name);
        let body = payload::events_request_body(
            &payload::MetaEvent {
                event_name: &event.event_name,
                event_time: event.timestamp,
                event_id: &event_id,
                ctwa_clid: &ctwa_clid,
                waba_id: &account.waba_id,
                email_hash: None,
                external_id_hash: None,
                value: event.value,
                currency: event.currency.as_deref(),
                content_ids: &[],
                automatic_event: true,
            },
            None,
            state.settings.partner_agent.as_deref(),
        );
        let now_ms = now.timestamp_millis();
        let record = ConversionRecord {
            account_id: account.id.clone(),
            event_name: event.event_name.clone(),
            event_id,
            conversation_id,
            event_time: event.timestamp,
            source: ConversionSource::AutomaticEvent,
            dataset_id,
            request_body: body,
            status: ConversionStatus::Queued,
            attempts: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            next_attempt_at_ms: Some(now_ms),
            events_received: 0,
            events_failed: 0,
            trace_id: None,
            duration_ms: 0,
            error: None,
            warnings: Vec::new(),
        };
        if let crate::store::Begin::Started = state.store.begin_conversion(record).await? {
            queued = true;
        }
    }
    if queued {
        state.outbox_wakeup.notify_one();
    }
    Ok(())
}
