//! Prometheus metrics for `GET /metrics`: every name in one place, recorded into a
//! `metrics-exporter-prometheus` recorder that each [`Metrics`] owns, so two applications in one
//! process never share a counter.
//!
//! Not `prometheus-client`: it writes OpenMetrics, where a counter's family is named without its
//! `_total` (`# TYPE ctwa_webhooks_received counter`), which would rename every family that
//! dashboards and tests already use. The exporter writes the Prometheus text format with the names
//! as given and the labels in the order they are written here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use actix_web::http::{Method, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::ingest::IngestReport;

pub const WEBHOOKS_RECEIVED: &str = "ctwa_webhooks_received_total";
pub const WEBHOOKS_VERIFIED: &str = "ctwa_webhooks_verified_total";
pub const WEBHOOKS_REJECTED: &str = "ctwa_webhooks_rejected_total";
pub const WEBHOOKS_UNROUTED: &str = "ctwa_webhook_changes_unrouted_total";
pub const WEBHOOKS_UNPARSEABLE: &str = "ctwa_webhooks_unparseable_total";
pub const MESSAGES: &str = "ctwa_messages_total";
pub const MESSAGES_DUPLICATE: &str = "ctwa_messages_duplicate_total";
pub const CLICKS: &str = "ctwa_clicks_total";
pub const AUTOMATIC_EVENTS: &str = "ctwa_automatic_events_total";
pub const CONVERSIONS: &str = "ctwa_conversions_total";
pub const CONVERSION_POSSIBLE_DUPLICATES: &str = "ctwa_conversion_possible_duplicates_total";
pub const OUTBOX_DEPTH: &str = "ctwa_outbox_depth";
pub const JOURNAL_PRUNED: &str = "ctwa_journal_entries_pruned_total";
pub const HTTP_REQUESTS: &str = "ctwa_http_requests_total";
pub const REQUEST_DURATION: &str = "ctwa_http_request_duration_seconds";

/// The content type of what [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Every counter with its `# HELP` text.
const COUNTER_HELP: [(&str, &str); 13] = [
    (WEBHOOKS_RECEIVED, "Webhook POSTs received."),
    (WEBHOOKS_VERIFIED, "Webhook POSTs with a valid signature, journaled and acknowledged."),
    (WEBHOOKS_REJECTED, "Webhook POSTs refused, by reason."),
    (WEBHOOKS_UNPARSEABLE, "Verified webhook bodies that were not JSON or not shaped like a webhook."),
    (WEBHOOKS_UNROUTED, "Webhook changes held for a phone_number_id without an account."),
    (MESSAGES, "Inbound user messages recorded."),
    (MESSAGES_DUPLICATE, "Inbound messages ignored as redeliveries."),
    (CLICKS, "Ad clicks (referrals) recorded, by presence of ctwa_clid."),
    (AUTOMATIC_EVENTS, "Meta automatic events kept on conversations."),
    (CONVERSIONS, "Conversion outcomes, by status and Meta error code."),
    (CONVERSION_POSSIBLE_DUPLICATES, "Conversions sent again after an attempt whose outcome was unknown (Meta may count them twice)."),
    (JOURNAL_PRUNED, "Journaled webhook bodies deleted after the retention period."),
    (HTTP_REQUESTS, "HTTP requests answered, by method, route pattern and status."),
];

const REQUEST_DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The exporter keeps each latency sample until a render or an upkeep folds it into the buckets;
/// an upkeep every this many requests bounds that memory when nothing scrapes `/metrics`.
const REQUESTS_PER_UPKEEP: u64 = 1024;

/// The exporter ignores metadata; the recorder interface asks for it.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

pub struct Metrics {
    recorder: PrometheusRecorder,
    webhooks_received: Counter,
    webhooks_verified: Counter,
    webhooks_unparseable: Counter,
    webhooks_unrouted: Counter,
    messages: Counter,
    messages_duplicate: Counter,
    clicks_with_clid: Counter,
    clicks_without_clid: Counter,
    automatic_events: Counter,
    possible_duplicates: Counter,
    journal_pruned: Counter,
    outbox_depth: Gauge,
    requests_since_upkeep: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION.to_string()),
                &REQUEST_DURATION_BUCKETS,
            )
            .expect("the latency bucket list is not empty")
            .build_recorder();
        for (name, help) in COUNTER_HELP {
            recorder.describe_counter(
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
        }
        recorder.describe_gauge(
            KeyName::from_const_str(OUTBOX_DEPTH),
            None,
            SharedString::const_str("Conversions waiting in the outbox."),
        );
        recorder.describe_histogram(
            KeyName::from_const_str(REQUEST_DURATION),
            None,
            SharedString::const_str("HTTP request latency by route pattern."),
        );

        // Registered now, so that they are exposed (at 0) before anything happens.
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let clicks = |clid: &'static str| {
            recorder.register_counter(
                &Key::from_parts(CLICKS, vec![Label::from_static_parts("ctwa_clid", clid)]),
                &METADATA,
            )
        };
        Self {
            webhooks_received: counter(WEBHOOKS_RECEIVED),
            webhooks_verified: counter(WEBHOOKS_VERIFIED),
            webhooks_unparseable: counter(WEBHOOKS_UNPARSEABLE),
            webhooks_unrouted: counter(WEBHOOKS_UNROUTED),
            messages: counter(MESSAGES),
            messages_duplicate: counter(MESSAGES_DUPLICATE),
            clicks_with_clid: clicks("present"),
            clicks_without_clid: clicks("absent"),
            automatic_events: counter(AUTOMATIC_EVENTS),
            possible_duplicates: counter(CONVERSION_POSSIBLE_DUPLICATES),
            journal_pruned: counter(JOURNAL_PRUNED),
            outbox_depth: recorder.register_gauge(&Key::from_static_name(OUTBOX_DEPTH), &METADATA),
            requests_since_upkeep: AtomicU64::new(0),
            recorder,
        }
    }

    pub fn webhook_received(&self) {
        self.webhooks_received.increment(1);
    }

    pub fn webhook_rejected(&self, reason: &'static str) {
        let labels = vec![Label::from_static_parts("reason", reason)];
        self.labelled_counter(WEBHOOKS_REJECTED, labels)
            .increment(1);
    }

    pub fn webhook_ingested(&self, report: &IngestReport) {
        self.webhooks_verified.increment(1);
        if report.unparseable {
            self.webhooks_unparseable.increment(1);
        }
        self.webhooks_unrouted.increment(report.unrouted_changes);
        self.record_ingest(report);
    }

    /// Counts what ingestion did (also for changes replayed when an account is added).
    pub fn record_ingest(&self, report: &IngestReport) {
        self.messages.increment(report.messages);
        self.messages_duplicate.increment(report.duplicate_messages);
        self.clicks_with_clid.increment(report.clicks_with_clid);
        self.clicks_without_clid
            .increment(report.clicks_without_clid);
        self.automatic_events.increment(report.automatic_events);
    }

    pub fn conversion(&self, status: &str, meta_code: Option<i64>) {
        let code = meta_code.map_or_else(|| "none".to_string(), |code| code.to_string());
        let labels = vec![
            Label::new("status", status.to_string()),
            Label::new("meta_code", code),
        ];
        self.labelled_counter(CONVERSIONS, labels).increment(1);
    }

    /// A conversion sent again after an attempt whose outcome is unknown.
    pub fn possible_duplicate_sent(&self) {
        self.possible_duplicates.increment(1);
    }

    pub fn journal_pruned(&self, count: u64) {
        self.journal_pruned.increment(count);
    }

    pub fn set_outbox_depth(&self, depth: u64) {
        self.outbox_depth.set(depth as f64);
    }

    /// One answered request: counted by method, route pattern and status, and its latency
    /// observed by route pattern (the series `/metrics` has always had).
    pub fn observe_request(
        &self,
        method: &Method,
        route: &str,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let labels = vec![
            Label::from_static_parts("method", method_label(method)),
            Label::new("route", route.to_string()),
            Label::new("status", status.as_u16().to_string()),
        ];
        self.labelled_counter(HTTP_REQUESTS, labels).increment(1);
        let key = Key::from_parts(
            REQUEST_DURATION,
            vec![Label::new("route", route.to_string())],
        );
        self.recorder
            .register_histogram(&key, &METADATA)
            .record(elapsed.as_secs_f64());
        if self.requests_since_upkeep.fetch_add(1, Ordering::Relaxed) % REQUESTS_PER_UPKEEP
            == REQUESTS_PER_UPKEEP - 1
        {
            self.recorder.handle().run_upkeep();
        }
    }

    /// The Prometheus text exposition format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }

    /// The counter of one label combination (the recorder finds it or adds it).
    fn labelled_counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }
}

/// The method as a label value; methods outside the standard set share one value, so a client
/// inventing methods cannot add series without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(rendered: &str, name: &str) -> Option<f64> {
        rendered.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series == name).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn counters_keep_their_names_and_label_order() {
        let metrics = Metrics::new();
        metrics.webhook_received();
        metrics.webhook_rejected("invalid_signature");
        metrics.conversion("failed", Some(100));
        metrics.conversion("failed", Some(100));
        metrics.set_outbox_depth(3);
        let rendered = metrics.render();
        assert!(
            rendered.contains("# TYPE ctwa_webhooks_received_total counter"),
            "{rendered}"
        );
        assert_eq!(series(&rendered, "ctwa_webhooks_received_total"), Some(1.0));
        assert_eq!(
            series(
                &rendered,
                "ctwa_webhooks_rejected_total{reason=\"invalid_signature\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            series(
                &rendered,
                "ctwa_conversions_total{status=\"failed\",meta_code=\"100\"}"
            ),
            Some(2.0)
        );
        assert_eq!(series(&rendered, "ctwa_outbox_depth"), Some(3.0));
        assert_eq!(
            series(&rendered, "ctwa_clicks_total{ctwa_clid=\"absent\"}"),
            Some(0.0)
        );
        assert_eq!(
            series(&rendered, "ctwa_conversion_possible_duplicates_total"),
            Some(0.0)
        );
    }

    #[test]
    fn requests_are_counted_by_method_route_and_status_and_timed_by_route() {
        let metrics = Metrics::new();
        let route = "/v1/admin/accounts/{id}";
        for _ in 0..3 {
            metrics.observe_request(
                &Method::GET,
                route,
                StatusCode::OK,
                Duration::from_millis(2),
            );
        }
        metrics.observe_request(
            &Method::from_bytes(b"BREW").unwrap(),
            route,
            StatusCode::NOT_FOUND,
            Duration::from_secs(2),
        );
        let rendered = metrics.render();
        assert_eq!(
            series(
                &rendered,
                "ctwa_http_requests_total{method=\"GET\",route=\"/v1/admin/accounts/{id}\",status=\"200\"}"
            ),
            Some(3.0),
            "{rendered}"
        );
        assert_eq!(
            series(
                &rendered,
                "ctwa_http_requests_total{method=\"other\",route=\"/v1/admin/accounts/{id}\",status=\"404\"}"
            ),
            Some(1.0),
            "{rendered}"
        );
        let bucket = |le: &str| {
            series(
                &rendered,
                &format!(
                    "ctwa_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}}"
                ),
            )
        };
        assert_eq!(bucket("0.001"), Some(0.0), "{rendered}");
        assert_eq!(bucket("0.0025"), Some(3.0), "{rendered}");
        assert_eq!(bucket("1"), Some(3.0), "{rendered}");
        assert_eq!(bucket("5"), Some(4.0), "{rendered}");
        assert_eq!(bucket("+Inf"), Some(4.0), "{rendered}");
        assert_eq!(
            series(
                &rendered,
                &format!("ctwa_http_request_duration_seconds_count{{route=\"{route}\"}}")
            ),
            Some(4.0)
        );
    }

    #[test]
    fn two_instances_share_nothing() {
        let first = Metrics::new();
        let second = Metrics::new();
        first.webhook_received();
        first.observe_request(&Method::GET, "/healthz", StatusCode::OK, Duration::ZERO);
        let rendered = second.render();
        assert_eq!(series(&rendered, "ctwa_webhooks_received_total"), Some(0.0));
        assert!(!rendered.contains("/healthz"), "{rendered}");
    }
}
