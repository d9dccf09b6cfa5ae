//! Logging, request ids, per-route latency and the error envelope for responses actix makes.

use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};
use tracing::field::{Field, Visit};
use tracing::Instrument;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::error::{envelope_for_status, LogLimiter};
use crate::settings::LogFormat;
use crate::startup::AppState;

const FAILED_REQUEST_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

static FAILED_REQUEST_LOG: LogLimiter = LogLimiter::new(FAILED_REQUEST_LOG_INTERVAL);

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default filter.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sled=warn,actix_server=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.finish().with(QuietClientStreamErrors).try_init(),
        LogFormat::Json => builder
            .json()
            .finish()
            .with(QuietClientStreamErrors)
            .try_init(),
    };
}

/// Where actix-http logs the connections it closes.
const ACTIX_H1_DISPATCHER: &str = "actix_http::h1::dispatcher";

/// Drops actix-http's `ERROR stream error: …` line: it is logged for every connection that
/// actix-http closes after refusing a request it could not parse (a head over 128 KiB gets a
/// 431, a NUL or a bare CR in a header a 400) or that the client broke off. That is the
/// client's garbage, answered before the app sees the request, so it must not page anyone.
/// actix-http also logs the parse error itself at TRACE under the same target, which
/// `RUST_LOG=actix_http::h1::dispatcher=trace` shows; its other ERROR lines are kept.
///
/// Those refusals cannot get the JSON envelope or an `X-Request-Id`: actix-http 3 builds them in
/// its HTTP/1 dispatcher (`src/h1/dispatcher.rs`: the 431 at `Err(ParseError::TooLarge)`, the
/// 400 at the `Err(err)` arm after it, both queued as `DispatcherMessage::Error` and written by
/// `send_error_response(res, BoxBody::new(()))`, an empty body) without calling the app's
/// service, so no middleware runs, and neither `HttpServer` nor `HttpServiceBuilder` offers a
/// hook for those responses.
struct QuietClientStreamErrors;

impl<S: tracing::Subscriber> Layer<S> for QuietClientStreamErrors {
    fn event_enabled(&self, event: &tracing::Event<'_>, _: Context<'_, S>) -> bool {
        let metadata = event.metadata();
        if *metadata.level() != tracing::Level::ERROR || metadata.target() != ACTIX_H1_DISPATCHER {
            return true;
        }
        let mut message = EventMessage::default();
        event.record(&mut message);
        !message.0.starts_with("stream error")
    }
}

/// The `message` field of an event, formatted.
#[derive(Default)]
struct EventMessage(String);

impl Visit for EventMessage {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

/// Phone numbers in logs show their first three and last two digits only.
pub fn mask_phone(phone: &str) -> String {
    if phone.len() <= 5 {
        return "*".repeat(phone.len());
    }
    let (head, rest) = phone.split_at(3);
    let tail = &rest[rest.len() - 2..];
    format!("{head}{}{tail}", "*".repeat(rest.len() - 2))
}

fn valid_request_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Middleware: gives every request an id (reusing a valid incoming `X-Request-Id`), a tracing
/// span, a latency observation under its route pattern, and turns any bodiless error response
/// made by actix itself (unknown route, wrong method, oversized body) into the JSON envelope.
pub async fn request_context(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|value| valid_request_id(value))
        .map(str::to_string)
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 12]>()));
    let state = request.app_data::<web::Data<AppState>>().cloned();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %request.method(),
        path = %request.path(),
    );
    let started = Instant::now();
    let response = next.call(request).instrument(span.clone()).await?;
    let elapsed = started.elapsed();
    let status = response.status();
    let route = response
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_string());
    if let Some(state) = &state {
        state.metrics.observe_request(&route, elapsed);
    }
    let _entered = span.enter();
    if status.is_server_error() {
        // A full disk fails every request the same way; one line per route and status per
        // interval says as much as thousands.
        let key = format!("{} {route}", status.as_u16());
        if let Some(suppressed) = FAILED_REQUEST_LOG.admit("request failed", &key, Instant::now()) {
            tracing::warn!(
                status = status.as_u16(),
                elapsed_ms = elapsed.as_millis() as u64,
                route,
                suppressed,
                "request failed (logged once per {} s per route and status; `suppressed` counts the others)",
                FAILED_REQUEST_LOG_INTERVAL.as_secs()
            );
        }
    } else {
        tracing::debug!(
            status = status.as_u16(),
            elapsed_ms = elapsed.as_millis() as u64,
            "request served"
        );
    }

    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    let mut response = if status.as_u16() >= 400 && !is_json {
        let detail = response.response().error().map(|error| error.to_string());
        let (request, _) = response.into_parts();
        let replacement = envelope_for_status(status, detail).error_response();
        ServiceResponse::new(request, replacement)
    } else {
        response.map_into_boxed_body()
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_masked() {
        assert_eq!(mask_phone("16505551234"), "165******34");
        assert_eq!(mask_phone("123"), "***");
    }

    #[test]
    fn actix_stream_errors_are_dropped_and_every_other_line_is_kept() {
        use std::sync::{Arc, Mutex};

        struct Capture(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> Layer<S> for Capture {
            fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
                let mut message = EventMessage::default();
                event.record(&mut message);
                self.0.lock().unwrap().push(message.0);
            }
        }

        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry()
            .with(QuietClientStreamErrors)
            .with(Capture(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let parse_error = "Parse error: invalid Header provided";
            tracing::error!(target: "actix_http::h1::dispatcher", "stream error: {}", parse_error);
            tracing::error!(target: "actix_http::h1::dispatcher", "Response payload stream error: x");
            tracing::warn!(target: "actix_http::h1::dispatcher", "stream error: a warning");
            tracing::error!(target: "ctwa_relay::store", "stream error: one of ours");
        });
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                "Response payload stream error: x",
                "stream error: a warning",
                "stream error: one of ours",
            ]
        );
    }

    #[test]
    fn request_ids_are_checked() {
        assert!(valid_request_id("abc-123_x.y"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id(&"a".repeat(129)));
    }
}
