//! The outbox worker: redelivers queued conversions with capped exponential backoff, across
//! restarts, until they are sent, fail for good, or expire (older than Meta accepts).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{attempt_once, expire};
use crate::domain::conversion::MAX_EVENT_AGE_SECS;
use crate::startup::AppState;
use crate::store::{ConversionFailure, ConversionStatus, StoreError};

/// How many due conversions one pass takes.
const BATCH: usize = 100;

pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(state.settings.outbox_poll_interval) => {}
            _ = state.outbox_wakeup.notified() => {}
        }
        if let Err(error) = deliver_due(&state, &shutdown).await {
            tracing::error!(error = %crate::error::error_chain(&error), "the outbox pass failed; retrying on the next poll");
        }
    }
    tracing::debug!("the outbox worker stopped");
}

/// One pass over the due conversions.
pub async fn deliver_due(state: &AppState, shutdown: &CancellationToken) -> Result<(), StoreError> {
    let due = state
        .store
        .due_conversions(state.clock.now().timestamp_millis(), BATCH)
        .await?;
    let mut changed = false;
    for mut record in due {
        if shutdown.is_cancelled() {
            break;
        }
        let now = state.clock.now();
        if now.timestamp() - record.event_time > MAX_EVENT_AGE_SECS {
            expire(&mut record, now.timestamp_millis());
        } else if let Some(account) = state.store.account(&record.account_id) {
            attempt_once(state, &account, &mut record, state.graph.timeout()).await;
        } else {
            record.status = ConversionStatus::Failed;
            record.next_attempt_at_ms = None;
            record.events_failed = 1;
            record.error = Some(ConversionFailure {
                code: "account_not_found".into(),
                message: "the account was removed before the conversion could be delivered".into(),
                meta_code: None,
                meta_subcode: None,
            });
        }
        if record.status != ConversionStatus::Queued {
            let meta_code = record.error.as_ref().and_then(|error| error.meta_code);
            state.metrics.conversion(record.status.as_str(), meta_code);
            tracing::info!(
                account_id = %record.account_id,
                event_name = %record.event_name,
                status = record.status.as_str(),
                attempts = record.attempts,
                "outbox conversion settled"
            );
        }
        state.store.save_conversion(record).await?;
        changed = true;
    }
    if changed {
        state.store.durable().await?;
    }
    state
        .metrics
        .set_outbox_depth(state.store.outbox_depth().await?);
    Ok(())
}
