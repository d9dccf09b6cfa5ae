//! Prometheus metrics, kept in atomics and rendered by hand for `GET /metrics`.
//!
//! A dozen counters and one histogram do not justify the `metrics` facade and an exporter with
//! its own HTTP listener; this module is the whole of it, with every metric name in one place.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use crate::store::IngestReport;

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
pub const REQUEST_DURATION: &str = "ctwa_http_request_duration_seconds";

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    webhooks_received: AtomicU64,
    webhooks_verified: AtomicU64,
    webhooks_unparseable: AtomicU64,
    webhooks_unrouted: AtomicU64,
    messages: AtomicU64,
    messages_duplicate: AtomicU64,
    clicks_with_clid: AtomicU64,
    clicks_without_clid: AtomicU64,
    automatic_events: AtomicU64,
    possible_duplicates: AtomicU64,
    outbox_depth: AtomicU64,
    journal_pruned: AtomicU64,
    webhooks_rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Keyed by (status, Meta code or "none").
    conversions: Mutex<BTreeMap<(String, String), u64>>,
    request_durations: RwLock<HashMap<String, Histogram>>,
}

impl Metrics {
    pub fn webhook_received(&self) {
        self.webhooks_received.fetch_add(1, Ordering::Relaxed);
    }

    pub fn webhook_rejected(&self, reason: &'static str) {
        *self
            .webhooks_rejected
            .lock()
            .expect("metrics lock poisoned")
            .entry(reason)
            .or_default() += 1;
    }

    pub fn webhook_ingested(&self, report: &IngestReport) {
        self.webhooks_verified.fetch_add(1, Ordering::Relaxed);
        if report.unparseable {
            self.webhooks_unparseable.fetch_add(1, Ordering::Relaxed);
        }
        self.webhooks_unrouted
            .fetch_add(report.unrouted_changes, Ordering::Relaxed);
        self.record_ingest(report);
    }

    /// Counts what ingestion did (also for changes replayed when an account is added).
    pub fn record_ingest(&self, report: &IngestReport) {
        self.messages.fetch_add(report.messages, Ordering::Relaxed);
        self.messages_duplicate
            .fetch_add(report.duplicate_messages, Ordering::Relaxed);
        self.clicks_with_clid
            .fetch_add(report.clicks_with_clid, Ordering::Relaxed);
        self.clicks_without_clid
            .fetch_add(report.clicks_without_clid, Ordering::Relaxed);
        self.automatic_events
            .fetch_add(report.automatic_events, Ordering::Relaxed);
    }

    pub fn conversion(&self, status: &str, meta_code: Option<i64>) {
        let code = meta_code.map_or_else(|| "none".to_string(), |code| code.to_string());
        *self
            .conversions
            .lock()
            .expect("metrics lock poisoned")
            .entry((status.to_string(), code))
            .or_default() += 1;
    }

    /// A conversion sent again after an attempt whose outcome is unknown.
    pub fn possible_duplicate_sent(&self) {
        self.possible_duplicates.fetch_add(1, Ordering::Relaxed);
    }

    pub fn journal_pruned(&self, count: u64) {
        self.journal_pruned.fetch_add(count, Ordering::Relaxed);
    }

    pub fn set_outbox_depth(&self, depth: u64) {
        self.outbox_depth.store(depth, Ordering::Relaxed);
    }

    pub fn observe_request(&self, route: &str, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let record = |histogram: &Histogram| {
            for (bucket, bound) in histogram.buckets.iter().zip(BUCKETS) {
                if seconds <= bound {
                    bucket.fetch_add(1, Ordering::Relaxed);
                }
            }
            histogram.count.fetch_add(1, Ordering::Relaxed);
            histogram
                .sum_micros
                .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        };
        if let Some(histogram) = self
            .request_durations
            .read()
            .expect("metrics lock poisoned")
            .get(route)
        {
            record(histogram);
            return;
        }
        let mut histograms = self
            .request_durations
            .write()
            .expect("metrics lock poisoned");
        record(histograms.entry(route.to_string()).or_default());
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        };
        counter(
            &mut out,
            WEBHOOKS_RECEIVED,
            "Webhook POSTs received.",
            &self.webhooks_received,
        );
        counter(
            &mut out,
            WEBHOOKS_VERIFIED,
            "Webhook POSTs with a valid signature, journaled and acknowledged.",
            &self.webhooks_verified,
        );
        let _ = writeln!(
            out,
            "# HELP {WEBHOOKS_REJECTED} Webhook POSTs refused, by reason.\n# TYPE {WEBHOOKS_REJECTED} counter"
        );
        for (reason, count) in self
            .webhooks_rejected
            .lock()
            .expect("metrics lock poisoned")
            .iter()
        {
            let _ = writeln!(out, "{WEBHOOKS_REJECTED}{{reason=\"{reason}\"}} {count}");
        }
        counter(
            &mut out,
            WEBHOOKS_UNPARSEABLE,
            "Verified webhook bodies that were not JSON or not shaped like a webhook.",
            &self.webhooks_unparseable,
        );
        counter(
            &mut out,
            WEBHOOKS_UNROUTED,
            "Webhook changes held for a phone_number_id without an account.",
            &self.webhooks_unrouted,
        );
        counter(
            &mut out,
            MESSAGES,
            "Inbound user messages recorded.",
            &self.messages,
        );
        counter(
            &mut out,
            MESSAGES_DUPLICATE,
            "Inbound messages ignored as redeliveries.",
            &self.messages_duplicate,
        );
        let _ = writeln!(
            out,
            "# HELP {CLICKS} Ad clicks (referrals) recorded.\n# TYPE {CLICKS} counter"
        );
        let _ = writeln!(
            out,
            "{CLICKS}{{ctwa_clid=\"present\"}} {}",
            self.clicks_with_clid.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "{CLICKS}{{ctwa_clid=\"absent\"}} {}",
            self.clicks_without_clid.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            AUTOMATIC_EVENTS,
            "Meta automatic events kept on conversations.",
            &self.automatic_events,
        );
        let _ = writeln!(
            out,
            "# HELP {CONVERSIONS} Conversion outcomes, by status and Meta error code.\n# TYPE {CONVERSIONS} counter"
        );
        for ((status, code), count) in self
            .conversions
            .lock()
            .expect("metrics lock poisoned")
            .iter()
        {
            let _ = writeln!(
                out,
                "{CONVERSIONS}{{status=\"{status}\",meta_code=\"{code}\"}} {count}"
            );
        }
        counter(
            &mut out,
            CONVERSION_POSSIBLE_DUPLICATES,
            "Conversions sent again after an attempt whose outcome was unknown (Meta may count them twice).",
            &self.possible_duplicates,
        );
        let _ = writeln!(
            out,
            "# HELP {OUTBOX_DEPTH} Conversions waiting in the outbox.\n# TYPE {OUTBOX_DEPTH} gauge\n{OUTBOX_DEPTH} {}",
            self.outbox_depth.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            JOURNAL_PRUNED,
            "Journaled webhook bodies deleted after the retention period.",
            &self.journal_pruned,
        );
        let _ = writeln!(
            out,
            "# HELP {REQUEST_DURATION} HTTP request latency by route pattern.\n# TYPE {REQUEST_DURATION} histogram"
        );
        let histograms = self
            .request_durations
            .read()
            .expect("metrics lock poisoned");
        let mut routes: Vec<&String> = histograms.keys().collect();
        routes.sort();
        for route in routes {
            let histogram = &histograms[route];
            for (bucket, bound) in histogram.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "{REQUEST_DURATION}_bucket{{route=\"{route}\",le=\"{bound}\"}} {}",
                    bucket.load(Ordering::Relaxed)
                );
            }
            let count = histogram.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{REQUEST_DURATION}_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "{REQUEST_DURATION}_sum{{route=\"{route}\"}} {}",
                histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "{REQUEST_DURATION}_count{{route=\"{route}\"}} {count}");
        }
        out
    }
}
