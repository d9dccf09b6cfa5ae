//! The background worker: redelivers queued conversions with capped exponential backoff, across
//! restarts, until they are sent, fail for good, or expire (older than Meta accepts); and, once
//! an hour, deletes journaled webhook bodies past their retention.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Service;
use crate::domain::conversion::MAX_EVENT_AGE_SECS;
use crate::domain::conversion_record::ConversionStatus;
use crate::store::StoreError;

/// How many due conversions one pass takes.
const BATCH: usize = 100;

/// How often the journal retention runs, by the (injectable) clock.
const PRUNE_EVERY_SECS: i64 = 3600;

impl Service {
    /// The worker loop: an outbox pass on every poll or wakeup, the journal retention once an
    /// hour, until `shutdown`.
    pub async fn run_outbox(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last_prune: Option<i64> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.policy.outbox_poll_interval) => {}
                _ = self.outbox_wakeup.notified() => {}
            }
            if let Err(error) = self.deliver_due(&shutdown).await {
                crate::error::log_store_failure(
                    &error,
                    "the outbox pass failed; retrying on the next poll",
                );
            }
            let now = self.clock.now_secs();
            if last_prune.is_none_or(|last| now - last >= PRUNE_EVERY_SECS) {
                last_prune = Some(now);
                self.prune_journal(&shutdown).await;
            }
        }
        tracing::debug!("the outbox worker stopped");
    }

    /// Deletes journaled webhook bodies older than the retention, in batches (not while another
    /// pass of the worker runs); failures are logged.
    pub async fn prune_journal(&self, shutdown: &CancellationToken) {
        const BATCH: usize = 10_000;
        let Some(days) = self.policy.journal_retention_days else {
            return;
        };
        let _one_pass = self.worker_pass.lock().await;
        let cutoff = self.clock.now_secs() - i64::from(days) * 86_400;
        let mut total = 0;
        // In batches, so one pass never holds a huge amount of work and shutdown is not delayed.
        while !shutdown.is_cancelled() {
            match self.store.prune_journal(cutoff, BATCH).await {
                Ok(removed) => {
                    total += removed;
                    self.metrics.journal_pruned(removed);
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

    /// One pass over the due conversions (at most one pass runs at a time). Each record's
    /// attempt is durably marked in flight before its Graph call and its outcome durably stored
    /// right after, so a crash leaves at most one record whose outcome is unknown, and that one
    /// is known to be unknown.
    pub async fn deliver_due(&self, shutdown: &CancellationToken) -> Result<(), StoreError> {
        let _one_pass = self.worker_pass.lock().await;
        let due = self.store.due_conversions(self.now_ms(), BATCH).await?;
        // An outbox attempt may use the whole Graph timeout; the lease outlasts it.
        let lease = self.graph.timeout() + Duration::from_secs(1);
        for mut record in due {
            if shutdown.is_cancelled() {
                break;
            }
            let now = self.clock.now();
            let now_ms = now.timestamp_millis();
            if record.in_flight_since_ms().is_some() {
                record.interrupted(now_ms, &self.policy.retry);
            } else if now.timestamp() - record.event_time() > MAX_EVENT_AGE_SECS {
                record.expire(now_ms);
            } else if let Some(account) = self.store.account(record.account_id()) {
                record.start_attempt(now_ms, lease, true);
                self.persist_attempt(&record).await?;
                self.send_marked(&account, &mut record, self.graph.timeout())
                    .await;
            } else {
                record.account_gone(now_ms);
            }
            if record.status() != ConversionStatus::Queued {
                let meta_code = record.error().and_then(|error| error.meta_code);
                self.metrics.conversion(record.status().as_str(), meta_code);
                tracing::info!(
                    account_id = %record.account_id(),
                    event_name = %record.event_name(),
                    status = record.status().as_str(),
                    attempts = record.attempts(),
                    possible_duplicate = record.possible_duplicate(),
                    "outbox conversion settled"
                );
            }
            self.store.save_conversion(record).await?;
        }
        self.metrics
            .set_outbox_depth(self.store.outbox_depth().await?);
        Ok(())
    }
}
