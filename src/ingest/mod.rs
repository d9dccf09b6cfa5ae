//! Ingestion, the first use case: a verified webhook is journaled, the first-touch rules are
//! applied to the attribution state, and both are durable before Meta gets its 200.

pub mod first_touch;

use std::sync::Arc;

use bytes::Bytes;

use crate::attribution::AutomaticEvent;
use crate::clock::Clock;
use crate::conversions;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::store::{Store, StoreError};
use crate::webhook::{parse_webhook, verify_signature};

/// Bodies up to this size are parsed on the request's own thread.
const PARSE_INLINE_LIMIT: usize = 64 * 1024;

/// What ingestion did, for metrics and logs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct IngestReport {
    pub journal_seq: u64,
    pub unparseable: bool,
    pub unrouted_changes: u64,
    pub messages: u64,
    pub duplicate_messages: u64,
    pub messages_without_user: u64,
    pub clicks_with_clid: u64,
    pub clicks_without_clid: u64,
    pub conversations_opened: u64,
    pub automatic_events: u64,
    pub automatic_events_pending: u64,
    pub duplicate_automatic_events: u64,
    /// Automatic events newly kept on a conversation: (account id, conversation id, event).
    pub matched_automatic_events: Vec<(String, String, AutomaticEvent)>,
}

impl IngestReport {
    pub fn absorb(&mut self, other: IngestReport) {
        self.unrouted_changes += other.unrouted_changes;
        self.messages += other.messages;
        self.duplicate_messages += other.duplicate_messages;
        self.messages_without_user += other.messages_without_user;
        self.clicks_with_clid += other.clicks_with_clid;
        self.clicks_without_clid += other.clicks_without_clid;
        self.conversations_opened += other.conversations_opened;
        self.automatic_events += other.automatic_events;
        self.automatic_events_pending += other.automatic_events_pending;
        self.duplicate_automatic_events += other.duplicate_automatic_events;
        self.matched_automatic_events
            .extend(other.matched_automatic_events);
    }
}

/// Why a webhook POST was refused before anything was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no app secret is configured")]
    NotConfigured,
    #[error("the X-Hub-Signature-256 header is missing")]
    MissingSignature,
    #[error("the X-Hub-Signature-256 header does not match the body")]
    InvalidSignature,
}

impl Rejection {
    /// The reason label of `ctwa_webhooks_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::NotConfigured => "not_configured",
            Rejection::MissingSignature => "missing_signature",
            Rejection::InvalidSignature => "invalid_signature",
        }
    }
}

/// Verify → journal → first-touch rules → durable, and the replay of webhooks held for a number
/// whose account is added later.
pub struct Service {
    store: Store,
    clock: Clock,
    app_secrets: Vec<Secret>,
    verify_token: Option<Secret>,
    /// The attribution window, in seconds (SPEC §5.2 rule 4).
    window_secs: i64,
    metrics: Arc<Metrics>,
    conversions: Arc<conversions::Service>,
}

impl Service {
    pub fn new(
        store: Store,
        clock: Clock,
        app_secrets: Vec<Secret>,
        verify_token: Option<Secret>,
        window_secs: i64,
        metrics: Arc<Metrics>,
        conversions: Arc<conversions::Service>,
    ) -> Self {
        Self {
            store,
            clock,
            app_secrets,
            verify_token,
            window_secs,
            metrics,
            conversions,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Meta's subscription handshake: the challenge to echo when the mode is `subscribe` and
    /// the token is this server's verify token.
    pub fn handshake<'a>(
        &self,
        mode: Option<&str>,
        token: Option<&str>,
        challenge: Option<&'a str>,
    ) -> Option<&'a str> {
        match (&self.verify_token, mode, token, challenge) {
            (Some(expected), Some("subscribe"), Some(token), Some(challenge))
                if expected.matches(token) =>
            {
                Some(challenge)
            }
            _ => None,
        }
    }

    /// False when no app secret is configured, so no webhook can be verified.
    pub fn accepts_webhooks(&self) -> bool {
        !self.app_secrets.is_empty()
    }

    /// Checks `X-Hub-Signature-256` over the raw body against every configured app secret.
    pub fn verify(&self, signature: Option<&str>, body: &[u8]) -> Result<(), Rejection> {
        let outcome = if self.app_secrets.is_empty() {
            Err(Rejection::NotConfigured)
        } else {
            match signature {
                None => Err(Rejection::MissingSignature),
                Some(header) if verify_signature(&self.app_secrets, header, body) => Ok(()),
                Some(_) => Err(Rejection::InvalidSignature),
            }
        };
        if let Err(rejection) = outcome {
            self.metrics.webhook_rejected(rejection.reason());
        }
        outcome
    }

    /// Journals a verified body and applies it; returns once both are durable. Automatic events
    /// it matched are queued as conversions for the accounts that forward them.
    pub async fn ingest(&self, body: Bytes) -> Result<IngestReport, StoreError> {
        let received_at = self.clock.now_secs();
        // Small bodies (nearly all of them) are parsed here, which costs less than a handoff;
        // Meta's largest batches go to the blocking pool so they never hold up a worker.
        let groups = if body.len() <= PARSE_INLINE_LIMIT {
            parse_webhook(&body, received_at)
        } else {
            let parse_body = body.clone();
            crate::telemetry::spawn_blocking_in_span(move || {
                parse_webhook(&parse_body, received_at)
            })
            .await
            .map_err(|_| StoreError::TaskGone)?
        };
        let unparseable = groups.is_none();
        let window_secs = self.window_secs;
        let apply = groups.map(|groups| -> crate::store::UnitOfWork {
            Box::new(move |unit| first_touch::apply_webhook(unit, groups, window_secs))
        });
        let (journal_seq, mut report) = self.store.record_webhook(body, received_at, apply).await?;
        report.journal_seq = journal_seq;
        report.unparseable = unparseable;
        let matched = std::mem::take(&mut report.matched_automatic_events);
        self.conversions.forward_automatic(matched).await?;
        self.metrics.webhook_ingested(&report);
        if report.unparseable {
            tracing::warn!(
                journal_seq,
                "a signed webhook body is not JSON shaped like a webhook; journaled and acknowledged"
            );
        }
        if report.unrouted_changes > 0 {
            tracing::info!(
                journal_seq,
                changes = report.unrouted_changes,
                "webhook changes for a phone_number_id without an account are held until it is added"
            );
        }
        Ok(report)
    }

    /// Processes every webhook held for `phone_number_id`, now that its account exists;
    /// durable on return.
    pub async fn replay_held(&self, phone_number_id: String) -> Result<IngestReport, StoreError> {
        let window_secs = self.window_secs;
        let number = phone_number_id.clone();
        let mut report = self
            .store
            .attribution_unit(Box::new(move |unit| {
                first_touch::replay_held(unit, &number, parse_webhook, window_secs)
            }))
            .await?;
        let matched = std::mem::take(&mut report.matched_automatic_events);
        self.conversions.forward_automatic(matched).await?;
        self.metrics.record_ingest(&report);
        if report.messages > 0 || report.automatic_events > 0 {
            tracing::info!(
                phone_number_id,
                messages = report.messages,
                automatic_events = report.automatic_events,
                "replayed webhook changes held for the new account"
            );
        }
        Ok(report)
    }
}
