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
use crate::settings::Settings;
use crate::startup::AppState;
use crate::store::{
    Begin, ConversionFailure, ConversionRecord, ConversionSource, ConversionStatus, NewConversion,
    StoreError,
};

/// What one attempt to deliver led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Meta took the event, refused it for good, or its outcome can no longer be learned: the
    /// record is final.
    Final,
    /// Meta did not take it; worth trying again later. The record stays queued.
    Transient,
    /// Meta may have it: the record waits for its one guarded resend.
    Unanswered,
}

/// The outbox's wait before its next attempt: the base after a request ran out of budget,
/// doubling with each attempt the outbox itself made, capped.
fn outbox_backoff(settings: &Settings, outbox_attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(outbox_attempts.min(20));
    settings
        .outbox_backoff_base
        .saturating_mul(factor)
        .min(settings.outbox_backoff_max)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Marks the record's next Graph call in flight; the caller makes that durable before it sends.
/// Until `lease` has passed, the outbox leaves the record alone.
pub fn start_attempt(record: &mut ConversionRecord, now_ms: i64, lease: Duration, outbox: bool) {
    record.attempts += 1;
    if outbox {
        record.outbox_attempts += 1;
    }
    if record.unknown_outcomes > 0 {
        record.possible_duplicate = true;
    }
    record.in_flight_since_ms = Some(now_ms);
    record.updated_at_ms = now_ms;
    record.next_attempt_at_ms = Some(now_ms.saturating_add(millis(lease)));
}

/// An attempt whose outcome is unknown. The first one is followed by a single resend, no
/// earlier than the guard interval, flagged `possibleDuplicate`; after a second, the record is
/// held as `unknown` and never sent again automatically.
fn outcome_unknown(record: &mut ConversionRecord, now_ms: i64, settings: &Settings) -> Attempt {
    record.in_flight_since_ms = None;
    record.updated_at_ms = now_ms;
    record.unknown_outcomes += 1;
    if record.unknown_outcomes == 1 {
        record.status = ConversionStatus::Queued;
        record.next_attempt_at_ms =
            Some(now_ms.saturating_add(millis(settings.unknown_resend_after)));
        return Attempt::Unanswered;
    }
    record.status = ConversionStatus::Unknown;
    record.events_failed = 1;
    record.next_attempt_at_ms = None;
    if let Some(error) = &mut record.error {
        error.message = format!(
            "Meta's answer was lost twice ({}); the event is not sent again automatically. Check Events Manager, and send it with a new eventId only if it is missing there",
            error.code
        );
    }
    Attempt::Final
}

/// Applies the answer of one Graph call to a record (status, counts, error, trace id, the next
/// outbox time).
fn apply_answer(
    record: &mut ConversionRecord,
    answer: Result<EventsReceived, GraphError>,
    now_ms: i64,
    settings: &Settings,
) -> Attempt {
    record.in_flight_since_ms = None;
    record.updated_at_ms = now_ms;
    let error = match answer {
        Ok(received) if received.events_received >= 1 => {
            record.status = ConversionStatus::Sent;
            record.events_received = received.events_received;
            record.events_failed = 0;
            record.trace_id = received.fbtrace_id;
            record.error = None;
            record.next_attempt_at_ms = None;
            return Attempt::Final;
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
            return Attempt::Final;
        }
        Err(error) => error,
    };
    record.trace_id = error.trace_id().or(record.trace_id.take());
    record.error = Some(ConversionFailure {
        code: error.code(),
        message: error.actionable_message(),
        meta_code: error.meta_code(),
        meta_subcode: error.meta_subcode(),
    });
    let settled = match error.class() {
        ErrorClass::Transient => {
            let backoff = outbox_backoff(settings, record.outbox_attempts);
            record.next_attempt_at_ms = Some(now_ms.saturating_add(millis(backoff)));
            return Attempt::Transient;
        }
        ErrorClass::Unanswered => return outcome_unknown(record, now_ms, settings),
        ErrorClass::Permanent => ConversionStatus::Failed,
        ErrorClass::Unreadable => ConversionStatus::Unknown,
    };
    record.status = settled;
    record.events_received = 0;
    record.events_failed = 1;
    record.next_attempt_at_ms = None;
    Attempt::Final
}

/// Marks an expired record: still undelivered once Meta would no longer accept it.
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

/// A record found in flight once its lease passed: the process that sent it stopped before it
/// could store Meta's answer, so Meta may have the event.
pub fn interrupted(record: &mut ConversionRecord, now_ms: i64, settings: &Settings) -> Attempt {
    record.error = Some(ConversionFailure {
        code: "send_interrupted".into(),
        message: "ctwa-relay stopped while sending this event, so Meta may have it; it is sent once more after a guard interval and flagged possibleDuplicate".into(),
        meta_code: None,
        meta_subcode: None,
    });
    outcome_unknown(record, now_ms, settings)
}

/// Makes the record's in-flight mark durable, counting resends that may duplicate an event.
pub async fn persist_attempt(
    state: &AppState,
    record: &ConversionRecord,
) -> Result<(), StoreError> {
    state.store.save_conversion(record.clone()).await?;
    state.store.durable().await?;
    if record.unknown_outcomes > 0 {
        state.metrics.possible_duplicate_sent();
    }
    Ok(())
}

/// One Graph call for a record already durably marked in flight, applied to the record. The
/// caller stores the outcome.
pub async fn send_marked(
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
    let now_ms = state.clock.now().timestamp_millis();
    apply_answer(record, answer, now_ms, &state.settings)
}

/// What [`record_and_deliver`] did.
pub struct Delivered {
    pub record: ConversionRecord,
    /// The same (account, event name, event id) was already recorded: nothing was sent.
    pub deduplicated: bool,
}

/// Records a new conversion durably, with its first attempt marked in flight, then sends it,
/// retrying transient failures within the request budget, and stores the outcome durably. A
/// conversion still undelivered when the budget runs out, or whose answer was lost, stays
/// queued for the outbox.
pub async fn record_and_deliver(
    state: &AppState,
    account: &Account,
    mut record: ConversionRecord,
) -> Result<Delivered, StoreError> {
    let started = Instant::now();
    let deadline = started + state.settings.delivery_budget;
    // While this request sends, the outbox leaves the record alone until the lease passes.
    let lease = state.settings.delivery_budget + state.graph.timeout() + Duration::from_secs(1);
    start_attempt(
        &mut record,
        state.clock.now().timestamp_millis(),
        lease,
        false,
    );
    let mut record = match state.store.begin_conversion(record).await? {
        Begin::Existing(existing) => {
            return Ok(Delivered {
                record: *existing,
                deduplicated: true,
            })
        }
        Begin::Started(started) => *started,
    };
    state.store.durable().await?;
    if record.possible_duplicate {
        state.metrics.possible_duplicate_sent();
    }
    let mut pause = Duration::from_millis(100);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = state
            .graph
            .timeout()
            .min(remaining)
            .max(Duration::from_millis(50));
        match send_marked(state, account, &mut record, timeout).await {
            // Out of budget: the outbox takes over at the time the answer set.
            Attempt::Transient if Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                start_attempt(
                    &mut record,
                    state.clock.now().timestamp_millis(),
                    lease,
                    false,
                );
                persist_attempt(state, &record).await?;
            }
            _ => break,
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
    Ok(Delivered {
        record,
        deduplicated: false,
    })
}

/// The answer to a conversion request (Zernio's fields first), and its HTTP status.
pub fn result_body(
    record: &ConversionRecord,
    deduplicated: bool,
) -> (actix_web::http::StatusCode, Value) {
    let failures: Vec<Value> = match (&record.status, &record.error) {
        (
            ConversionStatus::Failed | ConversionStatus::Expired | ConversionStatus::Unknown,
            Some(error),
        ) => vec![json!({
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
    if record.possible_duplicate {
        body["possibleDuplicate"] = json!(true);
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
        let record = ConversionRecord::queued(
            NewConversion {
                account_id: account.id.clone(),
                event_name: event.event_name.clone(),
                event_id,
                conversation_id,
                event_time: event.timestamp,
                source: ConversionSource::AutomaticEvent,
                dataset_id,
                request_body: body,
                warnings: Vec::new(),
            },
            now.timestamp_millis(),
        );
        if let Begin::Started(_) = state.store.begin_conversion(record).await? {
            queued = true;
        }
    }
    if queued {
        state.outbox_wakeup.notify_one();
    }
    Ok(())
}
