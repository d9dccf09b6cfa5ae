//! The bodies of `POST|GET /v1/whatsapp/conversions` and `GET|POST /v1/whatsapp/dataset`
//! (SPEC §4.4, §4.5): Zernio's field names and types, plus our extra fields.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::domain::conversion_record::{ConversionRecord, ConversionSource, ConversionStatus};
use crate::routes::rfc3339;

/// The `POST /v1/whatsapp/conversions` body, as Zernio names it. Unknown fields are ignored;
/// [`crate::conversions::request::validate`] applies the rules.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversionBody {
    /// An account visible to the key.
    #[schema(min_length = 1, pattern = "\\S")]
    pub account_id: String,
    /// From the allowlist (Meta's business-messaging events); `Lead` is refused with a hint to
    /// use `LeadSubmitted`.
    #[schema(example = "LeadSubmitted")]
    pub event_name: String,
    /// The stable dedup key: 1-256 characters.
    #[schema(min_length = 1, max_length = 256)]
    pub event_id: String,
    /// Unix seconds; default now. Refused when more than 7 days old, more than 5 minutes ahead,
    /// or in milliseconds.
    pub event_time: Option<i64>,
    /// The conversation to attribute to (preferred over `phoneE164`).
    pub conversation_id: Option<String>,
    /// Digits only, 7-15, with the country code: the phone's most recent ad-attributed
    /// conversation on the account.
    #[schema(pattern = "^[0-9]{7,15}$")]
    pub phone_e164: Option<String>,
    /// Finite, >= 0; needs `currency`.
    #[schema(minimum = 0)]
    pub value: Option<f64>,
    /// ISO 4217, any case.
    #[schema(example = "USD")]
    pub currency: Option<String>,
    /// At most 1000 ids of 1-256 characters.
    pub content_ids: Option<Vec<String>>,
    /// Hashed (SHA-256 of the trimmed, lower-cased address) before it is sent; never stored.
    pub email: Option<String>,
    /// Hashed like `email`.
    pub external_id: Option<String>,
    /// Sent to Meta as `test_event_code`.
    pub test_code: Option<String>,
    /// Build and return the exact Graph request (token redacted) without sending or recording it.
    #[serde(default)]
    pub dry_run: bool,
}

/// Where a conversion stands.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConversionStatusView {
    Queued,
    Sent,
    Failed,
    Expired,
    Unknown,
}

impl From<ConversionStatus> for ConversionStatusView {
    fn from(status: ConversionStatus) -> Self {
        match status {
            ConversionStatus::Queued => Self::Queued,
            ConversionStatus::Sent => Self::Sent,
            ConversionStatus::Failed => Self::Failed,
            ConversionStatus::Expired => Self::Expired,
            ConversionStatus::Unknown => Self::Unknown,
        }
    }
}

/// What asked for a conversion: the API, or one of Meta's automatic events forwarded.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConversionSourceView {
    Api,
    AutomaticEvent,
}

impl From<ConversionSource> for ConversionSourceView {
    fn from(source: ConversionSource) -> Self {
        match source {
            ConversionSource::Api => Self::Api,
            ConversionSource::AutomaticEvent => Self::AutomaticEvent,
        }
    }
}

/// An event Meta did not take, in Zernio's shape.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    /// Always 0: one event per request.
    pub event_index: u32,
    pub event_id: String,
    /// What happened and what to do.
    pub message: String,
    /// Meta's error, or ours (`timeout`, `malformed_response`, `expired`, ...).
    pub code: String,
    /// Meta's `error_subcode`.
    pub subcode: Option<i64>,
}

/// The last transient failure of a conversion still queued.
#[derive(Debug, Serialize, ToSchema)]
pub struct LastError {
    pub code: String,
    pub message: String,
}

/// The answer to a conversion: Zernio's fields first. 200 once Meta answered (`eventsFailed: 1`
/// when it refused), 202 with `queued: true` when the outbox will deliver it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversionResult {
    /// Always `metaads`.
    #[schema(example = "metaads")]
    pub platform: &'static str,
    pub events_received: i64,
    pub events_failed: i64,
    pub failures: Vec<Failure>,
    /// Meta's `fbtrace_id`.
    #[schema(required = true)]
    pub trace_id: Option<String>,
    pub status: ConversionStatusView,
    pub conversation_id: String,
    /// For example `outside_attribution_window`.
    pub warnings: Vec<String>,
    /// Present (true) when the outbox will deliver the event later.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
    /// Present on a queued conversion that failed at least once.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub last_error: Option<LastError>,
    /// Present (true) when the same (account, event name, event id) was already recorded:
    /// this is the original result and nothing was sent again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deduplicated: bool,
    /// Present (true) when Meta may have received the event more than once.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub possible_duplicate: bool,
}

impl ConversionResult {
    pub fn new(record: &ConversionRecord, deduplicated: bool) -> Self {
        let status = record.status();
        let failures = match (status, record.error()) {
            (
                ConversionStatus::Failed | ConversionStatus::Expired | ConversionStatus::Unknown,
                Some(error),
            ) => vec![Failure {
                event_index: 0,
                event_id: record.event_id().to_string(),
                message: error.message.clone(),
                code: error.code.clone(),
                subcode: error.meta_subcode,
            }],
            _ => Vec::new(),
        };
        let queued = status == ConversionStatus::Queued;
        Self {
            platform: "metaads",
            events_received: record.events_received(),
            events_failed: record.events_failed(),
            failures,
            trace_id: record.trace_id().map(str::to_string),
            status: status.into(),
            conversation_id: record.conversation_id().to_string(),
            warnings: record.warnings().to_vec(),
            queued,
            last_error: record.error().filter(|_| queued).map(|error| LastError {
                code: error.code.clone(),
                message: error.message.clone(),
            }),
            deduplicated,
            possible_duplicate: record.possible_duplicate(),
        }
    }
}

/// The 200 answer to `POST /v1/whatsapp/conversions`: the conversion's result, or with
/// `dryRun: true` the request that would have been sent.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ConversionAnswer {
    Result(ConversionResult),
    DryRun(DryRunResult),
}

/// The headers the Graph request would carry; the token is redacted.
#[derive(Debug, Serialize, ToSchema)]
pub struct DryRunHeaders {
    #[serde(rename = "Authorization")]
    #[schema(example = "Bearer [REDACTED]")]
    pub authorization: &'static str,
    #[serde(rename = "Content-Type")]
    #[schema(example = "application/json")]
    pub content_type: &'static str,
}

/// The exact Graph API request a conversion would send.
#[derive(Debug, Serialize, ToSchema)]
pub struct GraphRequest {
    #[schema(example = "POST")]
    pub method: &'static str,
    pub url: String,
    pub headers: DryRunHeaders,
    /// The body Meta would receive.
    pub body: serde_json::Value,
}

/// The answer to `dryRun: true`: nothing was sent or recorded.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DryRunResult {
    /// Always `metaads`.
    pub platform: &'static str,
    /// Always true.
    pub dry_run: bool,
    pub conversation_id: String,
    pub warnings: Vec<String>,
    pub request: GraphRequest,
}

impl DryRunResult {
    pub fn new(
        conversation_id: String,
        warnings: Vec<String>,
        url: String,
        body: serde_json::Value,
    ) -> Self {
        Self {
            platform: "metaads",
            dry_run: true,
            conversation_id,
            warnings,
            request: GraphRequest {
                method: "POST",
                url,
                headers: DryRunHeaders {
                    authorization: "Bearer [REDACTED]",
                    content_type: "application/json",
                },
                body,
            },
        }
    }
}

/// One conversion as the history and the lookups show it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryItem {
    /// When it was recorded, RFC 3339 UTC.
    pub timestamp: String,
    pub event_name: String,
    pub event_id: String,
    /// RFC 3339 UTC.
    pub event_time: String,
    pub conversation_id: String,
    pub source: ConversionSourceView,
    pub status: ConversionStatusView,
    pub events_received: i64,
    pub events_failed: i64,
    pub trace_id: Option<String>,
    pub duration_ms: u64,
    pub attempts: u32,
    pub possible_duplicate: bool,
    /// The last error's message.
    pub error: Option<String>,
    /// The last error's code.
    pub error_code: Option<String>,
}

impl From<&ConversionRecord> for HistoryItem {
    fn from(record: &ConversionRecord) -> Self {
        Self {
            timestamp: rfc3339(record.created_at_ms() / 1000),
            event_name: record.event_name().to_string(),
            event_id: record.event_id().to_string(),
            event_time: rfc3339(record.event_time()),
            conversation_id: record.conversation_id().to_string(),
            source: record.source().into(),
            status: record.status().into(),
            events_received: record.events_received(),
            events_failed: record.events_failed(),
            trace_id: record.trace_id().map(str::to_string),
            duration_ms: record.duration_ms(),
            attempts: record.attempts(),
            possible_duplicate: record.possible_duplicate(),
            error: record.error().map(|error| error.message.clone()),
            error_code: record.error().map(|error| error.code.clone()),
        }
    }
}

/// `GET /v1/whatsapp/conversions`: newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    pub events: Vec<HistoryItem>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// The account whose conversions to list.
    #[param(required = true)]
    pub account_id: Option<String>,
    /// 1-200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct DatasetQuery {
    #[param(required = true)]
    pub account_id: Option<String>,
}

/// `GET /v1/whatsapp/dataset`: the account's dataset, without asking Meta.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetAnswer {
    pub dataset_id: Option<String>,
}

/// `POST /v1/whatsapp/dataset`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetBody {
    pub account_id: String,
}

/// The WABA's dataset, found or created at Meta, now stored on the account.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionedDataset {
    pub dataset_id: String,
    /// True when Meta had none and one was created.
    pub created: bool,
}
