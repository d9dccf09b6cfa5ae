//! The API's errors: one catalogue of codes ([`Code`]: code, HTTP status, default message), one
//! error type built from it ([`ApiError`]), and one JSON envelope, `{"error": "...", "code": "..."}`.
//!
//! A 5xx body never carries internal detail: failures of ours go through [`ApiError::internal`]
//! (or the store's mapping), which log the whole cause chain once and answer the catalogue's
//! fixed message. Only `meta_error` (502) says more: Meta's answer, or how the call to Meta failed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::api::errors::ErrorBody;
use crate::store::StoreError;

/// Declares the catalogue: each code once, with its HTTP status and its default message.
macro_rules! error_codes {
    ($($variant:ident = $code:literal, $status:ident, $message:literal;)*) => {
        /// Every `code` the API answers with. The strings are part of the wire contract: clients
        /// branch on them, so a code is never renamed or given another status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($variant,)*
        }

        impl Code {
            /// Every code, in catalogue order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The machine-readable `code` of the error body.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $code,)*
                }
            }

            /// The HTTP status every answer with this code has.
            pub fn status(self) -> StatusCode {
                match self {
                    $(Code::$variant => StatusCode::$status,)*
                }
            }

            /// The human message used when the call site has nothing more specific to say.
            pub const fn default_message(self) -> &'static str {
                match self {
                    $(Code::$variant => $message,)*
                }
            }
        }
    };
}

error_codes! {
    // 400: the request itself is wrong; the message says which field and how to fix it.
    BadRequest = "bad_request", BAD_REQUEST, "the request could not be read";
    MalformedJson = "malformed_json", BAD_REQUEST, "the body is not valid JSON";
    MissingField = "missing_field", BAD_REQUEST, "a required field is missing";
    InvalidField = "invalid_field", BAD_REQUEST, "a field has the wrong type or value";
    UnreadableBody = "unreadable_body", BAD_REQUEST, "the request body could not be read";
    TooDeeplyNested = "too_deeply_nested", BAD_REQUEST, "the JSON body nests too deeply; send a flatter body";
    InvalidQuery = "invalid_query", BAD_REQUEST, "the query string could not be read";
    InvalidPath = "invalid_path", BAD_REQUEST, "the path could not be read";
    InvalidAccountId = "invalid_account_id", BAD_REQUEST, "accountId must not be empty";
    MissingAccountId = "missing_account_id", BAD_REQUEST, "accountId is required";
    UnknownAccount = "unknown_account", BAD_REQUEST, "the body names an account that is not registered";
    InvalidLimit = "invalid_limit", BAD_REQUEST, "limit must be between 1 and 200";
    InvalidPhone = "invalid_phone", BAD_REQUEST, "the phone number must be 7-15 digits with the country code";
    MissingPhone = "missing_phone", BAD_REQUEST, "give phone (digits with country code) or bsuid";
    MissingConversation = "missing_conversation", BAD_REQUEST, "give conversationId (preferred) or phoneE164 to identify the conversation";
    InvalidEventName = "invalid_event_name", BAD_REQUEST, "eventName is not accepted for business messaging";
    InvalidEventId = "invalid_event_id", BAD_REQUEST, "eventId must be 1-256 characters";
    EventTimeInMilliseconds = "event_time_in_milliseconds", BAD_REQUEST, "eventTime looks like milliseconds; send unix seconds";
    EventTimeTooOld = "event_time_too_old", BAD_REQUEST, "eventTime is more than 7 days old; Meta rejects such events";
    EventTimeInFuture = "event_time_in_future", BAD_REQUEST, "eventTime is more than 5 minutes in the future; check the sender's clock";
    InvalidValue = "invalid_value", BAD_REQUEST, "value must be a finite number >= 0";
    InvalidCurrency = "invalid_currency", BAD_REQUEST, "currency must be an ISO 4217 code such as USD, EUR or BRL";
    MissingCurrency = "missing_currency", BAD_REQUEST, "currency is required with value";
    MissingValue = "missing_value", BAD_REQUEST, "Purchase events need value and currency";
    InvalidContentIds = "invalid_content_ids", BAD_REQUEST, "contentIds must hold at most 1000 non-empty ids of up to 256 characters";
    InvalidEmail = "invalid_email", BAD_REQUEST, "email must be an e-mail address";
    // 401 and 403: who is calling.
    Unauthorized = "unauthorized", UNAUTHORIZED, "Unauthorized";
    MissingSignature = "missing_signature", UNAUTHORIZED, "the X-Hub-Signature-256 header is missing";
    InvalidSignature = "invalid_signature", UNAUTHORIZED, "the X-Hub-Signature-256 header does not match the body for any configured app secret";
    Forbidden = "forbidden", FORBIDDEN, "this route needs the admin token; API keys cannot use it";
    // 404: nothing there, or nothing this key may see (the two are never told apart).
    NotFound = "not_found", NOT_FOUND, "no such route";
    AccountNotFound = "account_not_found", NOT_FOUND, "no such account is visible to this key";
    ConversationNotFound = "conversation_not_found", NOT_FOUND, "no such conversation is visible to this key";
    KeyNotFound = "key_not_found", NOT_FOUND, "no such API key";
    MethodNotAllowed = "method_not_allowed", METHOD_NOT_ALLOWED, "this route does not accept that method";
    // 409: the request clashes with what is stored.
    Conflict = "conflict", CONFLICT, "the request conflicts with a stored record";
    AccountIdRetired = "account_id_retired", CONFLICT, "this account id belonged to a deleted account; choose another id";
    PayloadTooLarge = "payload_too_large", PAYLOAD_TOO_LARGE, "the request body is larger than this route accepts";
    UnsupportedMediaType = "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE, "send the body as application/json";
    // 422: a well-formed request that cannot be carried out for this account or conversation.
    NoCtwaClid = "no_ctwa_clid", UNPROCESSABLE_ENTITY, "the conversation has no Click-to-WhatsApp click id, so Meta cannot attribute a conversion to it";
    DatasetNotConfigured = "dataset_not_configured", UNPROCESSABLE_ENTITY, "the account has no Meta dataset: set metadata.metaCapiDatasetId, or POST /v1/whatsapp/dataset to provision one";
    // 5xx: ours or Meta's. The bodies never carry internal detail; the cause is in the log.
    InternalError = "internal_error", INTERNAL_SERVER_ERROR, "internal error; the details are in the server log";
    MetaError = "meta_error", BAD_GATEWAY, "Meta refused the request";
    StoreUnavailable = "store_unavailable", SERVICE_UNAVAILABLE, "the store could not save the request; nothing was acknowledged, retry later";
    StoreFailed = "store_failed", SERVICE_UNAVAILABLE, "the store failed to write or flush and still cannot; restart the process once the disk is writable (the details are in the server log)";
    WebhookNotConfigured = "webhook_not_configured", SERVICE_UNAVAILABLE, "no app secret is configured (set CTWA_APP_SECRETS); Meta will retry";
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for Code {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// An error answered to an API caller: a catalogue [`Code`] (which fixes the status), a message
/// (the code's default unless the call site says more) and optional extra body fields.
#[derive(Debug)]
pub struct ApiError {
    code: Code,
    status: StatusCode,
    message: Cow<'static, str>,
    /// Extra fields merged into the body (Meta's code on a 502, for example).
    details: Option<serde_json::Value>,
}

impl From<Code> for ApiError {
    fn from(code: Code) -> Self {
        Self::new(code)
    }
}

impl ApiError {
    /// The catalogue entry as it is: its status and default message.
    pub fn new(code: Code) -> Self {
        Self {
            code,
            status: code.status(),
            message: Cow::Borrowed(code.default_message()),
            details: None,
        }
    }

    /// A message more specific than the code's default (which field, which value, what to do).
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Cow::Owned(message.into());
        self
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn text(&self) -> &str {
        &self.message
    }

    pub fn unauthorized() -> Self {
        Self::new(Code::Unauthorized)
    }

    pub fn account_not_found(account_id: &str) -> Self {
        Self::new(Code::AccountNotFound)
            .message(format!("no account {account_id:?} is visible to this key"))
    }

    /// A failure that is ours, not the caller's: the cause is logged once, the body is opaque.
    pub fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %error_chain(error), "request failed");
        Self::new(Code::InternalError)
    }
}

/// Renders an error with all its sources: `outer: inner: innermost`.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        // The document's own error body, so what is served is what is described.
        let envelope = ErrorBody {
            error: self.message.to_string(),
            code: self.code,
        };
        let Some(details) = &self.details else {
            // Serialised from the struct, so `error` comes first as in `{"error":"Unauthorized"}`.
            return HttpResponse::build(self.status).json(envelope);
        };
        let mut body = serde_json::to_value(envelope).expect("an envelope serialises");
        if let (serde_json::Value::Object(extra), serde_json::Value::Object(map)) =
            (details, &mut body)
        {
            for (key, value) in extra {
                map.entry(key.clone()).or_insert(value.clone());
            }
        }
        HttpResponse::build(self.status).json(body)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(message) => Self::new(Code::Conflict).message(message),
            StoreError::AccountIdRetired(message) => {
                Self::new(Code::AccountIdRetired).message(message)
            }
            StoreError::Flush(_)
            | StoreError::Sled(_)
            | StoreError::Redb(_)
            | StoreError::Io { .. }
            | StoreError::TaskGone => {
                log_store_failure(&error, "store unavailable");
                Self::new(Code::StoreUnavailable)
            }
            other => Self::internal(&other),
        }
    }
}

/// Store failures repeat once per request while a disk is full; each distinct one is logged at
/// most once per [`STORE_FAILURE_LOG_INTERVAL`].
static STORE_FAILURE_LOG: LogLimiter = LogLimiter::new(STORE_FAILURE_LOG_INTERVAL);

const STORE_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs a store failure at ERROR, at most once per interval for identical failures, with the
/// number of identical ones left out since the last line.
pub fn log_store_failure(error: &(dyn std::error::Error + 'static), what: &'static str) {
    let chain = error_chain(error);
    if let Some(suppressed) = STORE_FAILURE_LOG.admit(what, &chain, Instant::now()) {
        tracing::error!(
            error = %chain,
            suppressed,
            "{what} (identical failures are logged once per {} s; `suppressed` counts those left out)",
            STORE_FAILURE_LOG_INTERVAL.as_secs()
        );
    }
}

/// Lets an identical log line through at most once per interval and counts the ones it held back.
pub struct LogLimiter {
    interval: Duration,
    seen: Mutex<BTreeMap<(&'static str, String), Window>>,
}

struct Window {
    logged_at: Instant,
    suppressed: u64,
}

/// Distinct messages remembered at most; the oldest are forgotten beyond it.
const LOG_LIMITER_CAPACITY: usize = 64;

impl LogLimiter {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: Mutex::new(BTreeMap::new()),
        }
    }

    /// `Some(held back since the last line)` when the line for (`what`, `detail`) should be
    /// logged at `now`, `None` when it is held back and counted.
    pub fn admit(&self, what: &'static str, detail: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let key = (what, detail.to_string());
        if let Some(window) = seen.get_mut(&key) {
            if now.saturating_duration_since(window.logged_at) < self.interval {
                window.suppressed += 1;
                return None;
            }
            let suppressed = window.suppressed;
            *window = Window {
                logged_at: now,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        if seen.len() >= LOG_LIMITER_CAPACITY {
            let oldest = seen
                .iter()
                .min_by_key(|(_, window)| window.logged_at)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                seen.remove(&oldest);
            }
        }
        seen.insert(
            key,
            Window {
                logged_at: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// The envelope for errors produced by actix itself (unknown routes, oversized or unreadable
/// bodies, bad query strings) so that every 4xx/5xx has the same shape. A 4xx status the
/// catalogue has no code for keeps its status with the code `bad_request`.
pub fn envelope_for_status(status: StatusCode, detail: Option<String>) -> ApiError {
    let code = match status {
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => Code::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => Code::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Code::UnsupportedMediaType,
        status if status.is_server_error() => Code::InternalError,
        _ => Code::BadRequest,
    };
    let mut error = ApiError::new(code);
    if let Some(detail) = detail.filter(|_| !status.is_server_error()) {
        error = error.message(format!("{}: {detail}", code.default_message()));
    }
    error.status = status;
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_unique_snake_case_and_an_error_status() {
        let mut seen = std::collections::BTreeSet::new();
        for code in Code::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} is in the catalogue twice");
            assert!(
                !text.is_empty() && text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{text} is not snake_case"
            );
            assert!(code.status().as_u16() >= 400, "{text}");
            assert!(!code.default_message().is_empty(), "{text}");
        }
    }

    #[test]
    fn a_server_error_body_is_opaque() {
        let cause = std::io::Error::other("/var/lib/ctwa/db: secret detail");
        let error = ApiError::internal(&cause);
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!error.text().contains("secret detail"));
        let replaced =
            envelope_for_status(StatusCode::BAD_GATEWAY, Some("upstream at 10.0.0.1".into()));
        assert_eq!(replaced.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(replaced.code(), Code::InternalError);
        assert!(!replaced.text().contains("10.0.0.1"));
    }

    #[test]
    fn an_uncatalogued_client_status_keeps_its_status() {
        let error = envelope_for_status(StatusCode::URI_TOO_LONG, Some("too long".into()));
        assert_eq!(error.status(), StatusCode::URI_TOO_LONG);
        assert_eq!(error.code(), "bad_request");
        assert_eq!(error.text(), "the request could not be read: too long");
    }

    #[test]
    fn an_identical_line_passes_once_per_interval_with_the_count_held_back() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(limiter.admit("store", "disk full", start), Some(0));
        for second in 1..10 {
            let now = start + Duration::from_secs(second);
            assert_eq!(limiter.admit("store", "disk full", now), None);
        }
        assert_eq!(
            limiter.admit("store", "disk full", start + Duration::from_secs(10)),
            Some(9)
        );
        assert_eq!(
            limiter.admit("store", "disk full", start + Duration::from_secs(11)),
            None
        );
        assert_eq!(
            limiter.admit("store", "disk full", start + Duration::from_secs(25)),
            Some(1)
        );
    }

    #[test]
    fn different_lines_are_limited_separately() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let now = Instant::now();
        assert_eq!(limiter.admit("store", "disk full", now), Some(0));
        assert_eq!(limiter.admit("store", "read-only", now), Some(0));
        assert_eq!(limiter.admit("readiness", "disk full", now), Some(0));
        assert_eq!(limiter.admit("store", "disk full", now), None);
        assert_eq!(limiter.admit("store", "read-only", now), None);
    }

    #[test]
    fn the_limiter_forgets_the_oldest_line_beyond_its_capacity() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        for index in 0..=LOG_LIMITER_CAPACITY as u64 {
            let now = start + Duration::from_millis(index);
            assert_eq!(limiter.admit("store", &index.to_string(), now), Some(0));
        }
        assert_eq!(limiter.seen.lock().unwrap().len(), LOG_LIMITER_CAPACITY);
        // The first line was forgotten, so it passes again at once; the latest is still held.
        assert_eq!(limiter.admit("store", "0", start), Some(0));
        let latest = LOG_LIMITER_CAPACITY.to_string();
        assert_eq!(limiter.admit("store", &latest, start), None);
    }
}
