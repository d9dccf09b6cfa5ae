//! The background worker: redelivers queued conversions with capped exponential backoff, across
//! restarts, until they are sent, fail for good, or expire (older than Meta accepts); and, once
//! an hour, deletes journaled webhook bodies past their retention.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{expire, interrupted, persist_attempt, send_marked, start_attempt};
use crate::domain::conversion::MAX_EVENT_AGE_SECS;
use crate::startup::AppState;
use crate::store::{ConversionFailure, ConversionStatus, StoreError};

/// How many due conversions one pass takes.
const BATCH: usize = 100;

/// How often the journal retention runs, by the (injectable) clock.
const PRUNE_EVERY_SECS: i64 = 3600;

pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut last_prune: Option<i64> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(state.settings.outbox_poll_interval) => {}
            _ = state.outbox_wakeup.notified() => {}
        }
        if let Err(error) = deliver_due(&state, &shutdown).await {
            crate::error::log_store_failure(
                &error,
                "the outbox pass failed; retrying on the next poll",
            );
        }
        let now = state.clock.now_secs();
        if last_prune.is_none_or(|last| now - last >= PRUNE_EVERY_SECS) {
            last_prune = Some(now);
            prune_journal(&state, now, &shutdown).await;
        }
    }
    tracing::debug!("the outbox worker stopped");
}

async fn prune_journal(state: &AppState, now: i64, shutdown: &CancellationToken) {
    const BATCH: usize = 10_000;
    let Some(days) = state.settings.journal_retention_days else {
        return;
    };
    let cutoff = now - i64::from(days) * 86_400;
    let mut total = 0;
    // In batches, so one pass never holds a huge amount of work and shutdown is not delayed.
    while !shutdown.is_cancelled() {
        match state.store.prune_journal(cutoff, BATCH).await {
            Ok(removed) => {
                total += removed;
                state.metrics.journal_pruned(removed);
                if removed < BATCH as u64 {
                    break;
                }
            }
            Err(error) => {
                crate::error::log_store_failure(&error, "pruning the webhook journal failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(
            removed = total,
            days,
            "deleted journaled webhook bodies past retention"
        );
    }
}

/// One pass over the due conversions. Each record's attempt is durably marked in flight before
/// its Graph call and its outcome durably stored right after, so a crash leaves at most one
/// record whose outcome is unknown, and that one is known to be unknown.
pub async fn deliver_due(state: &AppState, shutdown: &CancellationToken) -> Result<(), StoreError> {
    let due = state
        .store
        .due_conversions(state.clock.now().timestamp_millis(), BATCH)
        .await?;
    // An outbox attempt may use the whole Graph timeout; the lease outlasts it.
    let lease = state.graph.timeout() + std::time::Duration::from_secs(1);
    for mut record in due {
        if shutdown.is_cancelled() {
            break;
        }
        let now = state.clock.now();
        let now_ms = now.timestamp_millis();
        if record.in_flight_since_ms.is_some() {
            interrupted(&mut record, now_ms, &state.settings);
        } else if now.timestamp() - record.event_time > MAX_EVENT_AGE_SECS {
            expire(&mut record, now_ms);
        } else if let Some(account) = state.store.account(&record.account_id) {
            start_attempt(&mut record, now_ms, lease, true);
            persist_attempt(state, &record).await?;
            send_marked(state, &account, &mut record, state.graph.timeout()).await;
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
                possible_duplicate = record.possible_duplicate,
                "outbox conversion settled"
            );
        }
        state.store.save_conversion(record).await?;
        state.store.durable().await?;
    }
    state
        .metrics
        .set_outbox_depth(state.store.outbox_depth().await?);
    Ok(())
}
