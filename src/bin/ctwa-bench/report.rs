//! The report: JSON for machines, a Markdown table for BENCHMARKS.md.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Serialize, Clone, Copy, Default)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Percentiles {
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
            mean_ms: histogram.mean() / 1000.0,
        }
    }
}

/// Work done before a scenario's timed phase (filling the store, ingesting the phones that
/// conversions are sent for), timed on its own.
#[derive(Serialize, Clone)]
pub struct Setup {
    pub what: String,
    pub requests: u64,
    pub messages: u64,
    pub seconds: f64,
    pub messages_per_s: f64,
    pub errors: u64,
}

/// The Graph stand-in measured alone, with the same load as `convert`.
#[derive(Serialize, Clone)]
pub struct GraphAlone {
    pub requests_per_s: f64,
    pub latency: Percentiles,
    pub errors: u64,
    /// `convert`'s percentiles minus the stand-in's: the latency the server adds.
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
}

#[derive(Serialize, Clone)]
pub struct Scenario {
    pub scenario: String,
    /// `max` (as fast as answered) or `rate`.
    pub mode: &'static str,
    pub rate: Option<f64>,
    pub connections: usize,
    pub seconds: f64,
    /// Requests answered (any status).
    pub requests: u64,
    pub ok: u64,
    pub non_2xx: u64,
    /// Answered 2xx, but the body did not say what it should (an empty lookup, a conversion
    /// Meta did not receive).
    pub unexpected_bodies: u64,
    pub transport_errors: u64,
    pub errors: u64,
    pub requests_per_s: f64,
    /// Inbound messages per request (webhook scenarios), and per second.
    pub messages_per_request: u64,
    pub messages_per_s: Option<f64>,
    pub latency: Percentiles,
    /// Fixed rate only: how late the bench sent requests after their intended start.
    pub send_lag: Option<Percentiles>,
    pub ratio_to_ceiling: Option<f64>,
    pub setup: Option<Setup>,
    pub graph_alone: Option<GraphAlone>,
    /// Conversions the Graph stand-in received during this scenario.
    pub graph_events: Option<u64>,
    /// CPU the server used during the timed phase, in cores (CPU seconds per second), and per
    /// request; the bench's own, in cores.
    pub server_cores: Option<f64>,
    pub server_cpu_us_per_request: Option<f64>,
    pub bench_cores: Option<f64>,
    /// Server memory and store size when the scenario ended.
    pub server_rss_bytes: Option<u64>,
    pub server_peak_rss_bytes: Option<u64>,
    pub conversations_stored: u64,
    pub data_dir_bytes: Option<u64>,
    pub prebuild_seconds: f64,
    pub prebuilt_requests: u64,
    pub requests_built_during_run: u64,
    pub error_samples: Vec<String>,
}

#[derive(Serialize)]
pub struct Store {
    /// Bytes allocated on disk by the data directory after the server stopped.
    pub allocated_bytes: u64,
    /// Sum of the file lengths.
    pub apparent_bytes: u64,
    pub conversations: u64,
    pub bytes_per_conversation: Option<f64>,
}

#[derive(Serialize)]
pub struct ServerInfo {
    pub url: String,
    pub spawned: bool,
    pub binary: Option<String>,
    pub pid: Option<u32>,
    pub extra_env: Vec<String>,
    pub exit_status: Option<String>,
}

#[derive(Serialize)]
pub struct Report {
    pub command: String,
    pub started_at: String,
    pub cpus: usize,
    pub server: ServerInfo,
    pub scenarios: Vec<Scenario>,
    pub ceiling_requests_per_s: Option<f64>,
    pub server_peak_rss_bytes: Option<u64>,
    pub store: Option<Store>,
    /// Messages answered 2xx by the server, and what its `ctwa_messages_total` says.
    pub messages_acknowledged: u64,
    pub server_messages_total: Option<u64>,
    pub total_seconds: f64,
}

/// `12345678.9` → `12 345 679`.
pub fn group(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (position, digit) in digits.chars().enumerate() {
        if position > 0 && (digits.len() - position) % 3 == 0 {
            out.push(' ');
        }
        out.push(digit);
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.1}")
    }
}

/// The SPEC §7 target of a scenario.
fn target(scenario: &str) -> &'static str {
    match scenario {
        "ceiling" => "the reference",
        "ingest" => "≥ 25 000 req/s; p99 ≤ 10 ms at 10 000 req/s",
        "ingest-batch" => "≥ 250 000 messages/s",
        "convert" => "≥ 5 000/s; p99 added ≤ 2 ms",
        "lookup" => "≥ 50 000/s; p99 ≤ 1 ms (1 000 000 conversations)",
        _ => "",
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| scenario | mode | throughput | ratio to ceiling | p50 ms | p99 ms | p99.9 ms | errors | server RSS after / peak | target (SPEC §7) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for scenario in &self.scenarios {
            let mode = match scenario.rate {
                Some(rate) => format!("{} req/s, {} conn", group(rate), scenario.connections),
                None => format!("max, {} conn", scenario.connections),
            };
            let throughput = match scenario.messages_per_s {
                Some(messages) if scenario.messages_per_request > 1 => format!(
                    "{} req/s = **{} messages/s**",
                    group(scenario.requests_per_s),
                    group(messages)
                ),
                _ => format!("**{} req/s**", group(scenario.requests_per_s)),
            };
            let ratio = scenario
                .ratio_to_ceiling
                .map(|ratio| format!("{ratio:.3}"))
                .unwrap_or_else(|| "—".to_string());
            let memory = match (scenario.server_rss_bytes, scenario.server_peak_rss_bytes) {
                (Some(now), Some(peak)) => format!("{} / {}", mib(now), mib(peak)),
                _ => "—".to_string(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                scenario.scenario,
                mode,
                throughput,
                ratio,
                ms(scenario.latency.p50_ms),
                ms(scenario.latency.p99_ms),
                ms(scenario.latency.p999_ms),
                scenario.errors,
                memory,
                target(&scenario.scenario),
            );
        }
        out.push('\n');
        for scenario in &self.scenarios {
            if let Some(setup) = &scenario.setup {
                let _ = writeln!(
                    out,
                    "- {} setup: {} — {} messages in {:.1} s ({} messages/s), {} errors.",
                    scenario.scenario,
                    setup.what,
                    group(setup.messages as f64),
                    setup.seconds,
                    group(setup.messages_per_s),
                    setup.errors
                );
            }
            if let Some(graph) = &scenario.graph_alone {
                let _ = writeln!(
                    out,
                    "- {}: the Graph stand-in alone, same load: {} req/s, p50 {} ms, p99 {} ms; added by the server: p50 {} ms, p99 {} ms.",
                    scenario.scenario,
                    group(graph.requests_per_s),
                    ms(graph.latency.p50_ms),
                    ms(graph.latency.p99_ms),
                    ms(graph.added_p50_ms),
                    ms(graph.added_p99_ms)
                );
            }
            if let (Some(server), Some(per_request), Some(bench)) = (
                scenario.server_cores,
                scenario.server_cpu_us_per_request,
                scenario.bench_cores,
            ) {
                let _ = writeln!(
                    out,
                    "- {}: CPU — server {:.2} cores ({:.0} µs per request), bench {:.2} cores.",
                    scenario.scenario, server, per_request, bench
                );
            }
            if let Some(lag) = &scenario.send_lag {
                let _ = writeln!(
                    out,
                    "- {}: the bench sent requests late by p50 {} ms, p99 {} ms (counted in the latencies above).",
                    scenario.scenario,
                    ms(lag.p50_ms),
                    ms(lag.p99_ms)
                );
            }
            if scenario.requests_built_during_run > 0 {
                let _ = writeln!(
                    out,
                    "- {}: {} requests were built during the timed phase (the pre-built ones ran out; raise --prebuild-mb).",
                    scenario.scenario,
                    group(scenario.requests_built_during_run as f64)
                );
            }
            for sample in &scenario.error_samples {
                let _ = writeln!(out, "- {} error: {}", scenario.scenario, sample);
            }
        }
        if let Some(peak) = self.server_peak_rss_bytes {
            let _ = writeln!(out, "- Server peak RSS (VmHWM): {}.", mib(peak));
        }
        if let Some(store) = &self.store {
            let _ = writeln!(
                out,
                "- Store on disk after the run: {} allocated ({} apparent) for {} conversations = **{} bytes per conversation**.",
                mib(store.allocated_bytes),
                mib(store.apparent_bytes),
                group(store.conversations as f64),
                store
                    .bytes_per_conversation
                    .map(group)
                    .unwrap_or_else(|| "—".to_string())
            );
        }
        let _ = writeln!(
            out,
            "- Messages acknowledged: {}; the server's ctwa_messages_total: {}.",
            group(self.messages_acknowledged as f64),
            self.server_messages_total
                .map(|total| group(total as f64))
                .unwrap_or_else(|| "—".to_string())
        );
        out
    }
}
