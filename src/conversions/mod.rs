//! Conversions, the second use case: a business event is matched to the click that started its
//! conversation, recorded, and delivered to Meta with bounded retries; what cannot be delivered
//! now waits in the outbox (`outbox`), and Meta's automatic events are forwarded the same way.
//!
//! [`Service`] holds only what it needs: the store, the Graph client, the clock, the
//! [`DeliveryPolicy`], the metrics and the outbox wakeup. The record's rules (dedup, attempts,
//! outcomes) are the record's own, in [`crate::domain::conversion_record`].

pub mod outbox;
pub mod payload;
pub mod request;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::attribution::{most_recent_attributed, AutomaticEvent, Conversation};
use crate::clock::Clock;
use crate::domain::account::Account;
use crate::domain::conversion::{Currency, MAX_EVENT_AGE_SECS};
use crate::domain::conversion_record::{
    Attempt, Begin, ConversionRecord, ConversionSource, ConversionStatus, NewConversion,
    RetryPolicy,
};
use crate::error::{ApiError, Code};
use crate::graph::{GraphClient, GraphError};
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::{Store, StoreError};

use payload::{events_request_body, MetaEvent};
use request::{ConversionBody, Lookup, ValidConversion};

/// The delivery settings the service works by.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// How long a request may spend retrying transient failures before it answers 202.
    pub delivery_budget: Duration,
    /// The outbox's backoff and the guard before resending an unknown outcome.
    pub retry: RetryPolicy,
    /// How often the outbox worker looks for due conversions.
    pub outbox_poll_interval: Duration,
    /// The event names a request may send.
    pub event_names: Vec<String>,
    /// `partner_agent` of every events request, if set.
    pub partner_agent: Option<String>,
    /// An event later than this after its click gets the `outside_attribution_window` warning.
    pub attribution_window_secs: i64,
    /// Journaled webhook bodies older than this many days are deleted; `None` keeps them.
    pub journal_retention_days: Option<u32>,
}

impl DeliveryPolicy {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            delivery_budget: settings.delivery_budget,
            retry: RetryPolicy {
                outbox_backoff_base: settings.outbox_backoff_base,
                outbox_backoff_max: settings.outbox_backoff_max,
                unknown_resend_after: settings.unknown_resend_after,
            },
            outbox_poll_interval: settings.outbox_poll_interval,
            event_names: settings.event_names.clone(),
            partner_agent: settings.partner_agent.clone(),
            attribution_window_secs: settings.attribution_window_secs(),
            journal_retention_days: settings.journal_retention_days,
        }
    }
}

/// Why a conversion (or a dataset request) was not carried out. Each converts to the API
/// error with the code and status the API has always answered.
#[derive(Debug, thiserror::Error)]
pub enum ConversionError {
    #[error("no conversation {id:?} on account {account_id:?}")]
    ConversationNotFound { id: String, account_id: String },
    #[error("this phone has no conversation on the account")]
    PhoneWithoutConversation,
    #[error("none of this phone's conversations on the account came from a Click-to-WhatsApp ad click with a click id (organic chats, or Status-placement ads, which carry no ctwa_clid)")]
    PhoneWithoutClickId,
    #[error("the conversation came from a Status-placement ad, which carries no ctwa_clid, so Meta cannot attribute a conversion to it")]
    StatusAdWithoutClickId,
    #[error("the conversation started without an ad click (an organic chat), so there is no ctwa_clid to attribute a conversion to")]
    OrganicConversation,
    #[error("the account has no Meta dataset: set metadata.metaCapiDatasetId, or POST /v1/whatsapp/dataset to provision one")]
    DatasetNotConfigured,
    #[error("Meta refused the dataset request. {}", .0.actionable_message())]
    DatasetRefused(#[source] GraphError),
    #[error("the store failed")]
    Store(#[from] StoreError),
}

impl From<ConversionError> for ApiError {
    fn from(error: ConversionError) -> Self {
        let code = match error {
            // The store's own mapping: 503 for a failed disk, 409 for a conflict.
            ConversionError::Store(store) => return ApiError::from(store),
            ConversionError::DatasetRefused(ref graph) => {
                return ApiError::new(Code::MetaError)
                    .message(error.to_string())
                    .with_details(json!({
                        "metaCode": graph.meta_code(),
                        "metaSubcode": graph.meta_subcode(),
                        "traceId": graph.trace_id(),
                    }))
            }
            ConversionError::ConversationNotFound { .. }
            | ConversionError::PhoneWithoutConversation => Code::ConversationNotFound,
            ConversionError::PhoneWithoutClickId
            | ConversionError::StatusAdWithoutClickId
            | ConversionError::OrganicConversation => Code::NoCtwaClid,
            ConversionError::DatasetNotConfigured => Code::DatasetNotConfigured,
        };
        ApiError::new(code).message(error.to_string())
    }
}

/// A dry run: what would be sent, and to where; nothing is recorded.
#[derive(Debug)]
pub struct DryRun {
    pub conversation_id: String,
    pub warnings: Vec<String>,
    /// The events URL of the account's dataset.
    pub url: String,
    /// The exact body Meta would receive.
    pub body: Value,
}

/// What [`Service::submit`] did.
#[derive(Debug)]
pub enum Submitted {
    DryRun(DryRun),
    /// The conversion is recorded: sent, settled, or queued for the outbox.
    Recorded {
        record: Box<ConversionRecord>,
        /// The same (account, event name, event id) was already recorded: nothing was sent.
        deduplicated: bool,
    },
}

/// The dataset `provision_dataset` found or created, now stored on the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedDataset {
    pub dataset_id: String,
    pub created: bool,
}

/// The conversation a request names, with the click id and click time of its attribution.
struct Attributed {
    conversation: Conversation,
    ctwa_clid: String,
    clicked_at: i64,
}

pub struct Service {
    store: Store,
    graph: GraphClient,
    clock: Clock,
    policy: DeliveryPolicy,
    metrics: Arc<Metrics>,
    /// Wakes the outbox worker before its next poll.
    outbox_wakeup: Notify,
    /// One worker pass (outbox or journal retention) at a time, so a pass run on demand never
    /// works on what the worker's own pass holds.
    worker_pass: tokio::sync::Mutex<()>,
}

impl Service {
    pub fn new(
        store: Store,
        graph: GraphClient,
        clock: Clock,
        policy: DeliveryPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            graph,
            clock,
            policy,
            metrics,
            outbox_wakeup: Notify::new(),
            worker_pass: tokio::sync::Mutex::new(()),
        }
    }

    fn now_ms(&self) -> i64 {
        self.clock.now().timestamp_millis()
    }

    /// Applies SPEC §4.4 to a request body, with the configured allowlist and the current time.
    pub fn validate(&self, body: ConversionBody) -> Result<ValidConversion, ApiError> {
        request::validate(body, &self.policy.event_names, self.clock.now_secs())
    }

    /// Finds the conversation and its click id, or says why there is nothing to attribute.
    async fn attributed_conversation(
        &self,
        account_id: &str,
        lookup: &Lookup,
    ) -> Result<Attributed, ConversionError> {
        let conversation = match lookup {
            Lookup::Conversation(id) => match self.conversation(id.clone()).await? {
                Some(conversation) if conversation.account_id == account_id => conversation,
                _ => {
                    return Err(ConversionError::ConversationNotFound {
                        id: id.clone(),
                        account_id: account_id.to_string(),
                    })
                }
            },
            Lookup::Phone(phone) => {
                let conversations = self
                    .store
                    .phone_conversations(account_id.to_string(), phone.as_str().to_string())
                    .await?
                    .unwrap_or_default();
                if conversations.is_empty() {
                    return Err(ConversionError::PhoneWithoutConversation);
                }
                // SPEC §5.2 rule 6: the one whose click-id attribution is the most recent.
                most_recent_attributed(&conversations)
                    .cloned()
                    .ok_or(ConversionError::PhoneWithoutClickId)?
            }
        };
        let Some(click) = conversation.ctwa_attribution() else {
            return Err(match conversation.attribution() {
                Some(_) => ConversionError::StatusAdWithoutClickId,
                None => ConversionError::OrganicConversation,
            });
        };
        let ctwa_clid = click
            .ctwa_clid
            .clone()
            .expect("a click-id attribution has one");
        let clicked_at = click.clicked_at;
        Ok(Attributed {
            conversation,
            ctwa_clid,
            clicked_at,
        })
    }

    /// Everything a validated request leads to: the attributed conversation, the dataset, the
    /// warnings, the Meta payload; then a dry run's answer, or the record, delivered.
    pub async fn submit(
        &self,
        account: &Account,
        request: ValidConversion,
    ) -> Result<Submitted, ConversionError> {
        let Attributed {
            conversation,
            ctwa_clid,
            clicked_at,
        } = self
            .attributed_conversation(&account.id, &request.lookup)
            .await?;
        let dataset_id = account
            .metadata
            .meta_capi_dataset_id
            .clone()
            .ok_or(ConversionError::DatasetNotConfigured)?;
        let mut warnings = Vec::new();
        if request.event_time - clicked_at > self.policy.attribution_window_secs {
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
            self.policy.partner_agent.as_deref(),
        );
        if request.dry_run {
            return Ok(Submitted::DryRun(DryRun {
                conversation_id: conversation.id,
                warnings,
                url: self.graph.events_url(&dataset_id),
                body: meta_body,
            }));
        }
        let record = ConversionRecord::queued(
            NewConversion {
                account_id: account.id.clone(),
                event_name: request.event_name.as_str().to_string(),
                event_id: request.event_id.as_str().to_string(),
                conversation_id: conversation.id,
                event_time: request.event_time,
                source: ConversionSource::Api,
                dataset_id,
                request_body: meta_body,
                warnings,
            },
            self.now_ms(),
        );
        let (record, deduplicated) = self.record_and_deliver(account, record).await?;
        Ok(Submitted::Recorded {
            record: Box::new(record),
            deduplicated,
        })
    }

    /// Records a new conversion durably, with its first attempt marked in flight, then sends
    /// it, retrying transient failures within the request budget, and stores the outcome
    /// durably. A conversion still undelivered when the budget runs out, or whose answer was
    /// lost, stays queued for the outbox. `true` when the key was already recorded and nothing
    /// was sent.
    async fn record_and_deliver(
        &self,
        account: &Account,
        mut record: ConversionRecord,
    ) -> Result<(ConversionRecord, bool), StoreError> {
        let started = Instant::now();
        let deadline = started + self.policy.delivery_budget;
        // While this request sends, the outbox leaves the record alone until the lease passes.
        let lease = self.policy.delivery_budget + self.graph.timeout() + Duration::from_secs(1);
        record.start_attempt(self.now_ms(), lease, false);
        let mut record = match self.store.begin_conversion(record).await? {
            Begin::Existing(existing) => return Ok((*existing, true)),
            Begin::Started(started) => *started,
        };
        if record.possible_duplicate() {
            self.metrics.possible_duplicate_sent();
        }
        let mut pause = Duration::from_millis(100);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = self
                .graph
                .timeout()
                .min(remaining)
                .max(Duration::from_millis(50));
            match self.send_marked(account, &mut record, timeout).await {
                // Out of budget: the outbox takes over at the time the answer set.
                Attempt::Transient if Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    record.start_attempt(self.now_ms(), lease, false);
                    self.persist_attempt(&record).await?;
                }
                _ => break,
            }
        }
        record.set_duration(started.elapsed());
        self.store.save_conversion(record.clone()).await?;
        let meta_code = record.error().and_then(|error| error.meta_code);
        self.metrics.conversion(record.status().as_str(), meta_code);
        if record.status() == ConversionStatus::Queued {
            self.outbox_wakeup.notify_one();
        }
        Ok((record, false))
    }

    /// Makes the record's in-flight mark durable, counting resends that may duplicate an event.
    async fn persist_attempt(&self, record: &ConversionRecord) -> Result<(), StoreError> {
        self.store.save_conversion(record.clone()).await?;
        if record.unknown_outcomes() > 0 {
            self.metrics.possible_duplicate_sent();
        }
        Ok(())
    }

    /// One Graph call for a record already durably marked in flight, applied to the record.
    /// The caller stores the outcome.
    async fn send_marked(
        &self,
        account: &Account,
        record: &mut ConversionRecord,
        timeout: Duration,
    ) -> Attempt {
        let answer = self
            .graph
            .send_events(
                record.dataset_id(),
                &account.access_token,
                record.request_body(),
                timeout,
            )
            .await;
        record.apply_answer(answer, self.now_ms(), &self.policy.retry)
    }

    /// Queues Meta's automatic events as conversions for accounts that opted in. They go
    /// through the outbox, so the webhook path never waits for Meta. Each queued record is
    /// durable when this returns.
    pub async fn forward_automatic(
        &self,
        matched: Vec<(String, String, AutomaticEvent)>,
    ) -> Result<(), StoreError> {
        let mut queued = false;
        for (account_id, conversation_id, event) in matched {
            let Some(account) = self.store.account(&account_id) else {
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
            if !self.policy.event_names.contains(&event.event_name) {
                skip("the event name is not in the allowlist");
                continue;
            }
            let now = self.clock.now();
            if now.timestamp() - event.timestamp > MAX_EVENT_AGE_SECS {
                skip("the event is older than 7 days");
                continue;
            }
            let Some(conversation) = self.store.conversation(conversation_id.clone()).await? else {
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
            let body = events_request_body(
                &MetaEvent {
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
                self.policy.partner_agent.as_deref(),
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
            if let Begin::Started(_) = self.store.begin_conversion(record).await? {
                queued = true;
            }
        }
        if queued {
            self.outbox_wakeup.notify_one();
        }
        Ok(())
    }

    /// A conversation by id. A conversation merged into another one (when a late click
    /// regrouped its user's clicks) answers with the one it was merged into.
    pub async fn conversation(&self, id: String) -> Result<Option<Conversation>, StoreError> {
        let mut found = self.store.conversation(id).await?;
        // Merges never chain in practice; the bound only guards against a corrupt loop.
        for _ in 0..8 {
            match found
                .as_ref()
                .and_then(|conversation| conversation.merged_into.clone())
            {
                Some(next) => found = self.store.conversation(next).await?,
                None => break,
            }
        }
        Ok(found)
    }

    /// The account's conversions, newest first.
    pub async fn history(
        &self,
        account_id: String,
        limit: usize,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        self.store.conversion_history(account_id, limit).await
    }

    /// The latest conversions of a conversation, for lookups.
    pub async fn recent_for_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<ConversionRecord>, StoreError> {
        self.store
            .conversions_of_conversation(conversation_id.to_string(), 10)
            .await
    }

    /// Reads the WABA's dataset from Meta and creates one when there is none; stores it on the
    /// account. Safe to repeat.
    pub async fn provision_dataset(
        &self,
        mut account: Account,
    ) -> Result<ProvisionedDataset, ConversionError> {
        let existing = self
            .graph
            .get_dataset(&account.waba_id, &account.access_token)
            .await
            .map_err(ConversionError::DatasetRefused)?;
        let (dataset_id, created) = match existing {
            Some(dataset_id) => (dataset_id, false),
            None => (
                self.graph
                    .create_dataset(&account.waba_id, &account.access_token)
                    .await
                    .map_err(ConversionError::DatasetRefused)?,
                true,
            ),
        };
        if account.metadata.meta_capi_dataset_id.as_ref() != Some(&dataset_id) {
            account.metadata.meta_capi_dataset_id = Some(dataset_id.clone());
            account.updated_at = self.clock.now_secs();
            self.store.update_account(account).await?;
        }
        Ok(ProvisionedDataset {
            dataset_id,
            created,
        })
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;
    use actix_web::ResponseError;

    use super::*;
    use crate::graph::MetaError;

    /// Every refusal keeps the code, status and message the API answered before the service
    /// existed.
    #[test]
    fn refusals_answer_with_their_catalogue_codes() {
        let cases = [
            (
                ConversionError::ConversationNotFound {
                    id: "c1".into(),
                    account_id: "acc".into(),
                },
                "conversation_not_found",
                StatusCode::NOT_FOUND,
                "no conversation \"c1\" on account \"acc\"",
            ),
            (
                ConversionError::PhoneWithoutConversation,
                "conversation_not_found",
                StatusCode::NOT_FOUND,
                "this phone has no conversation on the account",
            ),
            (
                ConversionError::PhoneWithoutClickId,
                "no_ctwa_clid",
                StatusCode::UNPROCESSABLE_ENTITY,
                "none of this phone's conversations",
            ),
            (
                ConversionError::StatusAdWithoutClickId,
                "no_ctwa_clid",
                StatusCode::UNPROCESSABLE_ENTITY,
                "Status-placement ad",
            ),
            (
                ConversionError::OrganicConversation,
                "no_ctwa_clid",
                StatusCode::UNPROCESSABLE_ENTITY,
                "organic chat",
            ),
            (
                ConversionError::DatasetNotConfigured,
                "dataset_not_configured",
                StatusCode::UNPROCESSABLE_ENTITY,
                "POST /v1/whatsapp/dataset",
            ),
            (
                ConversionError::Store(StoreError::TaskGone),
                "store_unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "retry later",
            ),
        ];
        for (error, code, status, message) in cases {
            let answer = ApiError::from(error);
            assert_eq!(answer.code(), code);
            assert_eq!(answer.status_code(), status, "{code}");
            assert!(answer.text().contains(message), "{code}: {}", answer.text());
        }
    }

    #[tokio::test]
    async fn a_refused_dataset_request_is_a_502_with_metas_codes() {
        let refusal = GraphError::Meta {
            http_status: 400,
            error: Box::new(MetaError {
                message: "Permissions error".into(),
                code: 200,
                error_subcode: Some(1),
                error_user_title: None,
                error_user_msg: None,
                fbtrace_id: Some("TRACE".into()),
            }),
        };
        let answer = ApiError::from(ConversionError::DatasetRefused(refusal));
        assert_eq!(answer.code(), "meta_error");
        assert_eq!(answer.status_code(), StatusCode::BAD_GATEWAY);
        assert!(answer
            .text()
            .starts_with("Meta refused the dataset request. "));
        let body = actix_web::body::to_bytes(answer.error_response().into_body())
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "meta_error");
        assert_eq!(body["metaCode"], 200);
        assert_eq!(body["metaSubcode"], 1);
        assert_eq!(body["traceId"], "TRACE");
    }
}
