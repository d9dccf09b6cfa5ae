//! Logging: the subscriber, one span per request (tracing-actix-web) that every line of the
//! request carries, one line per request, spans carried into blocking work, and the JSON envelope
//! for the error responses actix makes itself.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, ResponseError};
use tracing::field::{Field, Visit};
use tracing::Span;
use tracing_actix_web::RootSpanBuilder;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::error::{envelope_for_status, LogLimiter};
use crate::metrics::Metrics;
use crate::settings::LogFormat;

const FAILED_REQUEST_LOG_INTERVAL: Duration = Duration::from_secs(10);

static FAILED_REQUEST_LOG: LogLimiter = LogLimiter::new(FAILED_REQUEST_LOG_INTERVAL);

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The route label of a request that no route matches.
const UNMATCHED_ROUTE: &str = "unmatched";

/// The target of the one line per request, so that a filter can leave the access log out and keep
/// the rest: `RUST_LOG=info,ctwa_relay::access=warn` keeps only the failed requests' WARN lines.
pub const ACCESS_LOG: &str = "ctwa_relay::access";

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default filter. Colours only
/// when standard output is a terminal, so files and log collectors get plain text.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sled=warn,actix_server=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.finish().with(QuietClientStreamErrors).try_init(),
        LogFormat::Json => builder
            .json()
            .finish()
            .with(QuietClientStreamErrors)
            .try_init(),
    };
}

/// `tokio::task::spawn_blocking` that runs `work` inside the caller's span, so the lines it logs
/// keep the request id (and every other field of the spans around the call). The caller's
/// subscriber goes along too, for when it is not the global one (a test's scoped subscriber).
pub fn spawn_blocking_in_span<F, R>(work: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = Span::current();
    let dispatch = tracing::dispatcher::get_default(|dispatch| dispatch.clone());
    tokio::task::spawn_blocking(move || {
        tracing::dispatcher::with_default(&dispatch, || span.in_scope(work))
    })
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

/// What the request span knows of a request, kept in the request's extensions for
/// [`answer_request`].
#[derive(Clone)]
struct RequestContext {
    /// A valid incoming `X-Request-Id`, or 24 fresh hex digits.
    request_id: String,
    /// The route pattern (`/v1/admin/accounts/{id}`), never the raw path, so the label and the
    /// log field have one value per route and hold no ids.
    route: String,
}

impl RequestContext {
    fn of(request: &ServiceRequest) -> Self {
        let request_id = request
            .headers()
            .get(REQUEST_ID)
            .and_then(|value| value.to_str().ok())
            .filter(|value| valid_request_id(value))
            .map(str::to_string)
            .unwrap_or_else(|| hex::encode(rand::random::<[u8; 12]>()));
        let route = request
            .match_pattern()
            .unwrap_or_else(|| UNMATCHED_ROUTE.to_string());
        Self { request_id, route }
    }
}

/// The span tracing-actix-web opens for each request (`.wrap(TracingLogger::<RequestSpan>::new())`)
/// and keeps entered while the handler runs and the body streams, so every line logged for the
/// request carries its `request_id`. The crate's default span would also put the full target
/// (query string included, where `hub.verify_token` travels), the user agent and the client
/// address on every line; this one holds the id, the method and the route pattern only.
///
/// The id is ours, not the crate's `tracing_actix_web::RequestId` (a fresh UUID that ignores the
/// incoming header): handlers that need it read the `X-Request-Id` of the response.
pub struct RequestSpan;

impl RootSpanBuilder for RequestSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let context = RequestContext::of(request);
        let span = tracing::info_span!(
            "request",
            request_id = %context.request_id,
            method = %request.method(),
            route = %context.route,
        );
        request.extensions_mut().insert(context);
        span
    }

    fn on_request_end<B: MessageBody>(
        _span: Span,
        _outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        // The outcome is logged by `answer_request`, which also knows the latency.
    }
}

/// Middleware inside [`RequestSpan`]: records the request in the metrics (by method, route
/// pattern and status), logs its one line, turns any bodiless error response made by actix itself
/// (unknown route, wrong method, oversized body) into the JSON envelope, and answers the request
/// id in `X-Request-Id`.
///
/// The line is INFO `request served`, or for a 5xx WARN `request failed`, rate-limited per route
/// and status (a full disk fails every request the same way); the 5xx lines the limit holds back
/// are DEBUG, all under the target [`ACCESS_LOG`]. It carries the status and the latency; the
/// span adds the id, method and route. Never bodies, query strings or headers.
pub async fn answer_request(
    metrics: web::Data<Metrics>,
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let started = Instant::now();
    let context = request
        .extensions()
        .get::<RequestContext>()
        .cloned()
        .unwrap_or_else(|| RequestContext::of(&request));
    let method = request.method().clone();
    // Handler errors arrive as responses; an `Err` would come from a middleware inside this one,
    // and there is none.
    let response = next.call(request).await?.map_into_boxed_body();
    let elapsed = started.elapsed();
    let status = response.status();
    metrics.observe_request(&method, &context.route, status, elapsed);
    let elapsed_ms = elapsed.as_micros() as f64 / 1000.0;
    if status.is_server_error() {
        let key = format!("{} {}", status.as_u16(), context.route);
        match FAILED_REQUEST_LOG.admit("request failed", &key, Instant::now()) {
            Some(suppressed) => tracing::warn!(
                target: ACCESS_LOG,
                status = status.as_u16(),
                elapsed_ms,
                suppressed,
                "request failed (logged once per {} s per route and status; `suppressed` counts the others)",
                FAILED_REQUEST_LOG_INTERVAL.as_secs()
            ),
            None => tracing::debug!(
                target: ACCESS_LOG,
                status = status.as_u16(),
                elapsed_ms,
                "request failed"
            ),
        }
    } else {
        tracing::info!(
            target: ACCESS_LOG,
            status = status.as_u16(),
            elapsed_ms,
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
        response
    };
    if let Ok(value) = HeaderValue::from_str(&context.request_id) {
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

    /// Everything a subscriber writes, one JSON object per line.
    #[derive(Clone, Default)]
    struct CapturedOutput(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for CapturedOutput {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl CapturedOutput {
        fn events(&self) -> Vec<serde_json::Value> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect()
        }
    }

    #[actix_web::test]
    async fn each_request_logs_one_line_and_every_line_of_it_carries_its_id() {
        use actix_web::{test, App, HttpResponse};

        let output = CapturedOutput::default();
        let writer = output.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let metrics = web::Data::new(Metrics::new());
        let app = test::init_service(
            App::new()
                .app_data(metrics.clone())
                .wrap(actix_web::middleware::from_fn(answer_request))
                .wrap(tracing_actix_web::TracingLogger::<RequestSpan>::new())
                .route(
                    "/things/{id}",
                    web::get().to(|| async {
                        tracing::info!("inside the handler");
                        spawn_blocking_in_span(|| tracing::info!("inside blocking work"))
                            .await
                            .unwrap();
                        HttpResponse::Ok().finish()
                    }),
                ),
        )
        .await;

        let request = test::TestRequest::get()
            .uri("/things/42?hub.verify_token=s3cret")
            .insert_header((REQUEST_ID, "req-abc"))
            .to_request();
        let served = test::call_service(&app, request).await;
        assert_eq!(served.status(), 200);
        assert_eq!(served.headers().get(REQUEST_ID).unwrap(), "req-abc");
        let request = test::TestRequest::get().uri("/nowhere").to_request();
        let missing = test::call_service(&app, request).await;
        assert_eq!(missing.status(), 404);
        let generated = missing
            .headers()
            .get(REQUEST_ID)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(generated.len(), 24, "{generated}");

        let events = output.events();
        let with_message = |message: &str| -> Vec<&serde_json::Value> {
            events
                .iter()
                .filter(|event| event["fields"]["message"] == message)
                .collect()
        };
        for message in ["inside the handler", "inside blocking work"] {
            let lines = with_message(message);
            assert_eq!(lines.len(), 1, "{message}: {events:#?}");
            assert_eq!(
                lines[0]["span"]["request_id"], "req-abc",
                "{message}: {events:#?}"
            );
        }
        let request_lines = with_message("request served");
        assert_eq!(request_lines.len(), 2, "{events:#?}");
        let (first, second) = (request_lines[0], request_lines[1]);
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["target"], ACCESS_LOG);
        assert_eq!(first["span"]["request_id"], "req-abc");
        assert_eq!(first["span"]["method"], "GET");
        assert_eq!(first["span"]["route"], "/things/{id}");
        assert_eq!(first["fields"]["status"], 200);
        assert!(first["fields"]["elapsed_ms"].is_f64(), "{first}");
        assert_eq!(second["span"]["request_id"], generated.as_str());
        assert_eq!(second["span"]["route"], UNMATCHED_ROUTE);
        assert_eq!(second["fields"]["status"], 404);
        // The raw path and the query string appear nowhere.
        let everything = serde_json::to_string(&events).unwrap();
        assert!(!everything.contains("/things/42"), "{everything}");
        assert!(!everything.contains("s3cret"), "{everything}");

        let rendered = metrics.render();
        assert!(
            rendered.contains(
                "ctwa_http_requests_total{method=\"GET\",route=\"/things/{id}\",status=\"200\"} 1\n"
            ),
            "{rendered}"
        );
        assert!(
            rendered.contains(
                "ctwa_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1\n"
            ),
            "{rendered}"
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
