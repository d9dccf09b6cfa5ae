//! One error type for the HTTP API and its JSON envelope: `{"error": "...", "code": "..."}`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra fields merged into the body (Meta's code on a 502, for example).
    pub details: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a str,
    code: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn account_not_found(account_id: &str) -> Self {
        Self::not_found(
            "account_not_found",
            format!("no account {account_id:?} is visible to this key"),
        )
    }

    /// A failure that is ours, not the caller's: the cause is logged once, the body is opaque.
    pub fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %error_chain(error), "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; the details are in the server log",
        )
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
        let envelope = Envelope {
            error: &self.message,
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
            StoreError::Conflict(message) => Self::new(StatusCode::CONFLICT, "conflict", message),
            StoreError::AccountIdRetired(message) => {
                Self::new(StatusCode::CONFLICT, "account_id_retired", message)
            }
            StoreError::Flush(_)
            | StoreError::Sled(_)
            | StoreError::Io { .. }
            | StoreError::TaskGone => {
                log_store_failure(&error, "store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store could not save the request; nothing was acknowledged, retry later",
                )
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
/// bodies, bad query strings) so that every 4xx/5xx has the same shape.
pub fn envelope_for_status(status: StatusCode, detail: Option<String>) -> ApiError {
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such route".to_string()),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this route does not accept that method".to_string(),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the request body is larger than this route accepts".to_string(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "send the body as application/json".to_string(),
        ),
        status if status.is_server_error() => (
            "internal_error",
            "internal error; the details are in the server log".to_string(),
        ),
        _ => ("bad_request", "the request could not be read".to_string()),
    };
    let message = match detail {
        Some(detail) if !status.is_server_error() => format!("{message}: {detail}"),
        _ => message,
    };
    ApiError::new(status, code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

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
