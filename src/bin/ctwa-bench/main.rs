//! `ctwa-bench`: the load generator of SPEC §7, like `redis-benchmark`.
//!
//! It drives a running ctwa-relay (`--url`) over loopback with many keep-alive connections, or
//! starts one itself (`--spawn`) on a temporary data directory with its own secrets, the Graph
//! URL pointing at the bench's in-process stand-in, and stops it with SIGTERM at the end.
//! Scenarios, in the order `all` runs them in one server: `ceiling` (`GET /healthz`), `ingest`
//! (one signed message per webhook POST), `ingest-batch` (100 per POST), `convert` (conversions
//! against the stand-in, which is then measured alone), `lookup` (attribution by phone over
//! `--conversations` stored conversations, filled first through batches).
//!
//! Every request is built (and signed) before the timed phase. Output: a Markdown table on
//! stdout, JSON with `--json FILE` (`-`: JSON on stdout, the table on stderr).

mod graph;
mod load;
mod payload;
mod report;
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use hyper::header::HeaderValue;

use load::{Outcome, Plan, Prepared, Stop, Target};
use payload::{Fleet, Mix};
use report::{GraphAlone, Percentiles, Report, Scenario, Setup};

#[derive(Parser, Debug)]
#[command(
    name = "ctwa-bench",
    about = "Load generator for ctwa-relay (SPEC §7): throughput and latency per scenario"
)]
struct Args {
    /// Scenarios to run, in this order (comma-separated or repeated); `all`: every one.
    #[arg(value_enum, value_delimiter = ',', default_value = "all")]
    scenarios: Vec<ScenarioName>,
    /// The running server to drive (ignored with --spawn).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Start a ctwa-relay on a temporary data directory and stop it with SIGTERM at the end;
    /// `--spawn=PATH` names the binary (default: the ctwa-relay beside this one).
    #[arg(long, value_name = "CTWA_RELAY", require_equals = true)]
    spawn: Option<Option<PathBuf>>,
    /// Extra environment for the spawned server, e.g. CTWA_STORE_ENGINE=redb (repeatable).
    #[arg(long = "server-env", value_name = "KEY=VALUE")]
    server_env: Vec<String>,
    /// The pid of a running server, to report its memory (a spawned one is known).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Concurrent keep-alive connections.
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// How long each scenario's timed phase runs (`10s`, `500ms`, `2m`).
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Instead of a duration: this many requests per scenario.
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Fixed rate (requests/s, all connections together); latency counts from each request's
    /// intended start. Without it: as fast as the server answers.
    #[arg(long)]
    rate: Option<f64>,
    /// Conversations stored before `lookup` is timed (filled through ingest-batch).
    #[arg(long, default_value_t = 1_000_000)]
    conversations: u64,
    /// Messages per POST in `ingest-batch` and the fills.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Phones (each with a CTWA click) ingested before `convert`, which cycles through them.
    #[arg(long, default_value_t = 10_000)]
    convert_phones: u64,
    /// The bench's own worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Admin token of a running server (a spawned one gets its own).
    #[arg(long, env = "CTWA_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// One of the running server's CTWA_APP_SECRETS, to sign webhooks (a spawned one gets its own).
    #[arg(long, env = "CTWA_BENCH_APP_SECRET", hide_env_values = true)]
    app_secret: Option<String>,
    /// Port of the Graph stand-in (0: any); a running server's CTWA_GRAPH_URL must point at it.
    #[arg(long, default_value_t = 0)]
    graph_port: u16,
    /// Write the JSON report here (`-`: stdout, and the table goes to stderr).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Memory for requests built before each timed phase; beyond it they are built live.
    #[arg(long, default_value_t = 256)]
    prebuild_mb: usize,
    /// Where the spawned server's temporary directory goes.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    tmp_dir: PathBuf,
    /// Keep the spawned server's data directory and log.
    #[arg(long)]
    keep_data: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ScenarioName {
    All,
    Ceiling,
    Ingest,
    IngestBatch,
    Convert,
    Lookup,
}

impl ScenarioName {
    fn name(self) -> &'static str {
        match self {
            ScenarioName::All => "all",
            ScenarioName::Ceiling => "ceiling",
            ScenarioName::Ingest => "ingest",
            ScenarioName::IngestBatch => "ingest-batch",
            ScenarioName::Convert => "convert",
            ScenarioName::Lookup => "lookup",
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write 10s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("`{text}`: the unit must be ms, s or m")),
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("`{text}`: the duration must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("the bench's runtime starts");
    // Ctrl-C drops the run, and with it the spawned server (killed) and its directory.
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(args) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Everything a scenario needs, and what the run has stored so far.
struct Bench {
    args: Args,
    target: Target,
    base_url: String,
    fleet: Arc<Fleet>,
    graph: graph::GraphStandIn,
    spawned: Option<server::Spawned>,
    server_pid: Option<u32>,
    /// Phones (= conversations, one message each) used so far: indexes `0..next_phone`.
    next_phone: u64,
    /// Messages the server answered 2xx.
    acknowledged: u64,
    ceiling: Option<f64>,
    admin: reqwest::Client,
}

fn target_of(url: &str) -> anyhow::Result<Target> {
    let parsed = url::Url::parse(url).with_context(|| format!("--url {url} is not a URL"))?;
    if parsed.scheme() != "http" {
        bail!(
            "--url {url}: ctwa-bench speaks plain HTTP (point it at the server, not a TLS proxy)"
        );
    }
    let addr = parsed
        .socket_addrs(|| Some(80))
        .with_context(|| format!("cannot resolve {url}"))?
        .into_iter()
        .next()
        .with_context(|| format!("{url} resolves to no address"))?;
    let host = HeaderValue::from_str(&addr.to_string()).expect("an address is a header value");
    Ok(Target { addr, host })
}

fn plan(args: &Args) -> Plan {
    Plan {
        connections: args.connections,
        stop: match args.requests {
            Some(requests) => Stop::Requests(requests),
            None => Stop::After(args.duration),
        },
        rate: args.rate,
        prebuild_bytes: args.prebuild_mb * 1024 * 1024,
    }
}

fn secret() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut scenarios: Vec<ScenarioName> = Vec::new();
    for scenario in &args.scenarios {
        match scenario {
            ScenarioName::All => scenarios.extend([
                ScenarioName::Ceiling,
                ScenarioName::Ingest,
                ScenarioName::IngestBatch,
                ScenarioName::Convert,
                ScenarioName::Lookup,
            ]),
            other => scenarios.push(*other),
        }
    }
    if args.connections == 0 || args.batch == 0 {
        bail!("--connections and --batch must be at least 1");
    }
    let mut extra_env = Vec::new();
    for pair in &args.server_env {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--server-env {pair}: write KEY=VALUE");
        };
        extra_env.push((key.to_string(), value.to_string()));
    }
    let graph =
        graph::GraphStandIn::start(args.graph_port).context("cannot start the Graph stand-in")?;
    let run_id: u32 = rand::random();
    let (spawned, base_url, admin_token, app_secret) = match &args.spawn {
        Some(binary) => {
            let binary = match binary {
                Some(binary) => binary.clone(),
                None => server::sibling_binary()?,
            };
            let admin_token = secret();
            let app_secret = secret();
            eprintln!("ctwa-bench: starting {} …", binary.display());
            let spawned = server::Spawned::start(server::SpawnConfig {
                binary: &binary,
                graph_url: &graph.url(),
                admin_token: &admin_token,
                app_secret: &app_secret,
                extra_env: &extra_env,
                tmp_dir: &args.tmp_dir,
                keep: args.keep_data,
            })
            .await?;
            let url = spawned.url.clone();
            (
                Some((spawned, binary)),
                url,
                Some(admin_token),
                Some(app_secret),
            )
        }
        None => (
            None,
            args.url.trim_end_matches('/').to_string(),
            args.admin_token.clone(),
            args.app_secret
                .as_deref()
                .map(|secrets| secrets.split(',').next().unwrap_or_default().to_string()),
        ),
    };
    let needs_admin = scenarios.iter().any(|s| *s != ScenarioName::Ceiling);
    if needs_admin && admin_token.is_none() {
        bail!("these scenarios create an account through the admin API: set --admin-token (or CTWA_ADMIN_TOKEN) to the server's admin token");
    }
    let needs_secret = scenarios
        .iter()
        .any(|s| !matches!(s, ScenarioName::Ceiling));
    if needs_secret && app_secret.is_none() {
        bail!("these scenarios sign webhooks: set --app-secret (or CTWA_BENCH_APP_SECRET) to one of the server's CTWA_APP_SECRETS");
    }
    let (spawned, binary) = match spawned {
        Some((spawned, binary)) => (Some(spawned), Some(binary)),
        None => (None, None),
    };
    let server_pid = spawned.as_ref().map(|s| s.pid()).or(args.server_pid);
    let fleet = Arc::new(Fleet::new(
        run_id,
        app_secret.as_deref(),
        admin_token.as_deref(),
    ));
    let mut bench = Bench {
        target: target_of(&base_url)?,
        base_url: base_url.clone(),
        fleet,
        graph,
        spawned,
        server_pid,
        next_phone: 0,
        acknowledged: 0,
        ceiling: None,
        admin: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()?,
        args,
    };
    if needs_admin {
        bench
            .create_account(admin_token.as_deref().unwrap_or_default())
            .await?;
    }
    let mut reports = Vec::new();
    for scenario in scenarios {
        eprintln!("ctwa-bench: {} …", scenario.name());
        let report = bench.scenario(scenario).await?;
        eprintln!(
            "ctwa-bench: {}: {} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            report.scenario,
            report::group(report.requests_per_s),
            report.latency.p50_ms,
            report.latency.p99_ms,
            report.errors
        );
        reports.push(report);
    }
    let server_messages_total = bench.server_messages().await;
    let peak = bench
        .server_pid
        .and_then(server::memory)
        .map(|(_, peak)| peak);
    let mut exit_status = None;
    let mut store = None;
    if let Some(spawned) = bench.spawned.as_mut() {
        let status = spawned.stop().await?;
        if !status.success() {
            bail!(
                "ctwa-relay exited with {status} after SIGTERM; its log:\n{}",
                spawned.log_tail(30)
            );
        }
        exit_status = Some(status.to_string());
        let (apparent, allocated) = server::dir_size(&spawned.data_dir)?;
        store = Some(report::Store {
            allocated_bytes: allocated,
            apparent_bytes: apparent,
            conversations: bench.next_phone,
            bytes_per_conversation: (bench.next_phone > 0)
                .then(|| allocated as f64 / bench.next_phone as f64),
        });
    }
    let report = Report {
        command,
        started_at,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        server: report::ServerInfo {
            url: base_url,
            spawned: bench.spawned.is_some(),
            binary: binary.map(|b| b.display().to_string()),
            pid: bench.server_pid,
            extra_env: bench.args.server_env.clone(),
            exit_status,
        },
        scenarios: reports,
        ceiling_requests_per_s: bench.ceiling,
        server_peak_rss_bytes: peak,
        store,
        messages_acknowledged: bench.acknowledged,
        server_messages_total,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report)?;
    let markdown = report.markdown();
    match &bench.args.json {
        Some(path) if path.as_os_str() == "-" => {
            println!("{json}");
            eprintln!("\n{markdown}");
        }
        Some(path) => {
            std::fs::write(path, json + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("{markdown}");
        }
        None => println!("{markdown}"),
    }
    Ok(())
}

impl Bench {
    async fn create_account(&self, admin_token: &str) -> anyhow::Result<()> {
        let response = self
            .admin
            .post(format!("{}/v1/admin/accounts", self.base_url))
            .bearer_auth(admin_token)
            .json(&self.fleet.account_body())
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base_url))?;
        let status = response.status();
        if status != 201 {
            let body = response.text().await.unwrap_or_default();
            bail!("creating the bench account answered {status}: {body}");
        }
        Ok(())
    }

    async fn server_messages(&self) -> Option<u64> {
        let text = self
            .admin
            .get(format!("{}/metrics", self.base_url))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        server::metric(&text, "ctwa_messages_total").map(|value| value as u64)
    }

    /// Webhook POSTs of `batch` messages each for the phones from `first` on.
    fn webhooks(&self, first: u64, batch: u64, mix: Mix) -> Arc<dyn load::Workload> {
        let fleet = self.fleet.clone();
        Arc::new(load::Requests {
            build: move |index: u64| {
                let body = fleet.webhook_body(first + index * batch, batch, mix);
                fleet.signed_webhook(body)
            },
            prebuild: true,
            expect: None,
        })
    }

    /// Runs a workload and accounts for the phones its webhooks used.
    async fn load(
        &mut self,
        workload: Arc<dyn load::Workload>,
        plan: Plan,
        messages_per_request: u64,
    ) -> Outcome {
        let outcome = load::run(&self.target, workload, plan, self.server_pid).await;
        self.next_phone += outcome.attempted * messages_per_request;
        self.acknowledged += outcome.ok * messages_per_request;
        outcome
    }

    /// Stores `messages` conversations through batches, as fast as the server takes them.
    async fn fill(&mut self, what: &str, messages: u64, mix: Mix) -> Setup {
        let batch = self.args.batch;
        let requests = messages.div_ceil(batch);
        let workload = self.webhooks(self.next_phone, batch, mix);
        let plan = Plan {
            stop: Stop::Requests(requests),
            rate: None,
            ..plan(&self.args)
        };
        let started = Instant::now();
        let outcome = self.load(workload, plan, batch).await;
        let seconds = started.elapsed().as_secs_f64();
        let stored = outcome.ok * batch;
        Setup {
            what: what.to_string(),
            requests,
            messages: stored,
            seconds,
            messages_per_s: stored as f64 / seconds.max(1e-9),
            errors: outcome.non_2xx + outcome.unexpected + outcome.transport,
        }
    }

    async fn scenario(&mut self, name: ScenarioName) -> anyhow::Result<Scenario> {
        let plan = plan(&self.args);
        let mut setup = None;
        let mut graph_alone = None;
        let mut graph_events = None;
        let (outcome, messages_per_request) = match name {
            ScenarioName::All => unreachable!("`all` is expanded before"),
            ScenarioName::Ceiling => {
                let workload: Arc<dyn load::Workload> = Arc::new(load::Requests {
                    build: |_| Prepared {
                        method: hyper::Method::GET,
                        path: "/healthz".to_string(),
                        headers: Vec::new(),
                        body: bytes::Bytes::new(),
                    },
                    prebuild: false,
                    expect: Some(r#""status":"ok""#),
                });
                (self.load(workload, plan, 0).await, 0)
            }
            ScenarioName::Ingest => {
                let workload = self.webhooks(self.next_phone, 1, Mix::Realistic);
                (self.load(workload, plan, 1).await, 1)
            }
            ScenarioName::IngestBatch => {
                let batch = self.args.batch;
                let workload = self.webhooks(self.next_phone, batch, Mix::Realistic);
                (self.load(workload, plan, batch).await, batch)
            }
            ScenarioName::Convert => {
                let phones = self.args.convert_phones.max(1);
                let first = self.next_phone;
                let filled = self
                    .fill(
                        &format!(
                            "{} phones with a CTWA click ingested",
                            report::group(phones as f64)
                        ),
                        phones,
                        Mix::AllReferrals,
                    )
                    .await;
                if filled.errors > 0 {
                    bail!(
                        "ingesting the phones for convert failed {} times",
                        filled.errors
                    );
                }
                setup = Some(filled);
                let fleet = self.fleet.clone();
                // Sent to Meta and accepted: anything else (a 422 for a missing click, a
                // failure Meta reported) is an error.
                let workload: Arc<dyn load::Workload> = Arc::new(load::Requests {
                    build: move |index: u64| fleet.conversion(index, first + index % phones),
                    prebuild: true,
                    expect: Some(r#""eventsReceived":1,"eventsFailed":0"#),
                });
                let events_before = self.graph.events();
                let outcome = self.load(workload, plan, 0).await;
                graph_events = Some(self.graph.events() - events_before);
                // The stand-in alone, with the same load: what the server adds is the difference.
                let graph_target = Target {
                    addr: self.graph.addr,
                    host: HeaderValue::from_str(&self.graph.addr.to_string())
                        .expect("an address is a header value"),
                };
                let direct: Arc<dyn load::Workload> = Arc::new(load::Requests {
                    build: payload::graph_event,
                    prebuild: true,
                    expect: Some(r#""events_received":1"#),
                });
                let alone = load::run(&graph_target, direct, plan, None).await;
                let convert = Percentiles::of(&outcome.latency);
                let stand_in = Percentiles::of(&alone.latency);
                graph_alone = Some(GraphAlone {
                    requests_per_s: alone.ok as f64 / alone.elapsed.as_secs_f64().max(1e-9),
                    latency: stand_in,
                    errors: alone.non_2xx + alone.unexpected + alone.transport,
                    added_p50_ms: convert.p50_ms - stand_in.p50_ms,
                    added_p99_ms: convert.p99_ms - stand_in.p99_ms,
                });
                (outcome, 0)
            }
            ScenarioName::Lookup => {
                let wanted = self.args.conversations;
                if self.next_phone < wanted {
                    let missing = wanted - self.next_phone;
                    let filled = self
                        .fill(
                            &format!(
                                "store filled to {} conversations through ingest-batch",
                                report::group(wanted as f64)
                            ),
                            missing,
                            Mix::Realistic,
                        )
                        .await;
                    if filled.errors > 0 {
                        bail!(
                            "filling the store for lookup failed {} times",
                            filled.errors
                        );
                    }
                    setup = Some(filled);
                }
                let fleet = self.fleet.clone();
                let phones = self.next_phone.max(1);
                let salt = u64::from(fleet.run);
                // Every phone looked up was stored: an empty answer is an error.
                let workload: Arc<dyn load::Workload> = Arc::new(load::Requests {
                    build: move |index: u64| fleet.lookup(payload::mix64(index ^ salt) % phones),
                    prebuild: false,
                    expect: Some(r#""conversations":[{"#),
                });
                (self.load(workload, plan, 0).await, 0)
            }
        };
        let seconds = outcome.elapsed.as_secs_f64().max(1e-9);
        let requests = outcome.ok + outcome.non_2xx + outcome.unexpected;
        let (server_cpu, bench_cpu) = (outcome.server_cpu, outcome.bench_cpu);
        let requests_per_s = requests as f64 / seconds;
        if name == ScenarioName::Ceiling {
            self.ceiling = Some(requests_per_s);
        }
        let memory = self.server_pid.and_then(server::memory);
        let data_dir_bytes = self
            .spawned
            .as_ref()
            .and_then(|spawned| server::dir_size(&spawned.data_dir).ok())
            .map(|(_, allocated)| allocated);
        Ok(Scenario {
            scenario: name.name().to_string(),
            mode: if plan.rate.is_some() { "rate" } else { "max" },
            rate: plan.rate,
            connections: plan.connections,
            seconds,
            requests,
            ok: outcome.ok,
            non_2xx: outcome.non_2xx,
            unexpected_bodies: outcome.unexpected,
            transport_errors: outcome.transport,
            errors: outcome.non_2xx + outcome.unexpected + outcome.transport,
            requests_per_s,
            messages_per_request,
            messages_per_s: (messages_per_request > 0)
                .then(|| outcome.ok as f64 * messages_per_request as f64 / seconds),
            latency: Percentiles::of(&outcome.latency),
            send_lag: outcome.send_lag.as_ref().map(Percentiles::of),
            ratio_to_ceiling: self.ceiling.map(|ceiling| requests_per_s / ceiling),
            setup,
            graph_alone,
            graph_events,
            server_cores: server_cpu.map(|cpu| cpu.as_secs_f64() / seconds),
            server_cpu_us_per_request: server_cpu
                .map(|cpu| cpu.as_secs_f64() * 1e6 / requests.max(1) as f64),
            bench_cores: bench_cpu.map(|cpu| cpu.as_secs_f64() / seconds),
            server_rss_bytes: memory.map(|(now, _)| now),
            server_peak_rss_bytes: memory.map(|(_, peak)| peak),
            conversations_stored: self.next_phone,
            data_dir_bytes,
            prebuild_seconds: outcome.prebuild.as_secs_f64(),
            prebuilt_requests: outcome.prebuilt,
            requests_built_during_run: outcome.built_live,
            error_samples: outcome.error_samples,
        })
    }
}
