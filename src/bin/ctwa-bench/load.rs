//! The load generator: many keep-alive HTTP/1.1 connections (hyper's client connection, one task
//! each doing its own I/O, no pool), driven either as fast as the server answers or at a fixed rate.
//!
//! At a fixed rate, request `i` is due at `start + i / rate` (connection `c` sends the requests
//! `i ≡ c mod connections`), and its latency is measured from that intended start, not from when
//! it was sent: a stalled server delays the requests behind it, and their wait counts (no
//! coordinated omission). How late the client itself sent requests is reported separately.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One request, ready to send: bodies are built (and signed) before the timed phase.
#[derive(Clone)]
pub struct Prepared {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// Builds request number `index` of a run.
pub trait Workload: Send + Sync + 'static {
    fn request(&self, index: u64) -> Prepared;
    /// Whether requests are worth building before the timed phase (signed bodies are; a GET path
    /// is cheaper to format than to fetch from memory).
    fn prebuild(&self) -> bool;
    /// Whether a 2xx body says what it should (a cheap look, not a parse).
    fn accepts(&self, body: &[u8]) -> bool;
}

/// A workload from a request builder, and the text every 2xx body must contain, if any.
pub struct Requests<F> {
    pub build: F,
    pub prebuild: bool,
    pub expect: Option<&'static str>,
}

impl<F: Fn(u64) -> Prepared + Send + Sync + 'static> Workload for Requests<F> {
    fn request(&self, index: u64) -> Prepared {
        (self.build)(index)
    }
    fn prebuild(&self) -> bool {
        self.prebuild
    }
    fn accepts(&self, body: &[u8]) -> bool {
        self.expect.is_none_or(|expected| {
            body.windows(expected.len())
                .any(|window| window == expected.as_bytes())
        })
    }
}

/// When a run ends.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    After(Duration),
    Requests(u64),
}

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub connections: usize,
    pub stop: Stop,
    /// Requests per second for all connections together; `None`: as fast as answered.
    pub rate: Option<f64>,
    /// How much memory pre-built requests may take.
    pub prebuild_bytes: usize,
}

/// The server's address, and the `Host` header that goes with it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: HeaderValue,
}

/// What one run measured. Latencies are in microseconds.
pub struct Outcome {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests answered with another status.
    pub non_2xx: u64,
    /// Requests answered 2xx with a body that does not say what it should.
    pub unexpected: u64,
    /// Connections refused or broken, requests without an answer.
    pub transport: u64,
    /// Indexes handed out: every index below this one was attempted.
    pub attempted: u64,
    /// From the start of the timed phase to the last answer.
    pub elapsed: Duration,
    /// Latency of every answered request (any status).
    pub latency: Histogram<u64>,
    /// Fixed rate only: how late the client sent requests after their intended start.
    pub send_lag: Option<Histogram<u64>>,
    /// How long building requests before the timed phase took, and how many were built.
    pub prebuild: Duration,
    pub prebuilt: u64,
    /// Requests that should have been pre-built but were built during the timed phase (the
    /// pre-built ones ran out).
    pub built_live: u64,
    /// The first few failures, to say what went wrong.
    pub error_samples: Vec<String>,
    /// CPU time the server (when its pid is known) and the bench used during the timed phase.
    pub server_cpu: Option<Duration>,
    pub bench_cpu: Option<Duration>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 100 s, three significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("the histogram bounds are valid")
}

struct Shared {
    target: Target,
    workload: Arc<dyn Workload>,
    prebuilt: Vec<Prepared>,
    plan: Plan,
    start: Instant,
    deadline: Option<Instant>,
    next: AtomicU64,
    built_live: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Shared {
    fn sample(&self, message: String) {
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 5 {
            samples.push(message);
        }
    }

    fn build(&self, index: u64) -> Request<Full<Bytes>> {
        let prepared = match self.prebuilt.get(index as usize) {
            Some(prepared) => prepared.clone(),
            None => {
                if self.workload.prebuild() {
                    self.built_live.fetch_add(1, Ordering::Relaxed);
                }
                self.workload.request(index)
            }
        };
        let mut builder = Request::builder()
            .method(prepared.method)
            .uri(prepared.path)
            .header(HOST, self.target.host.clone());
        for (name, value) in prepared.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Full::new(prepared.body))
            .expect("a prepared request is valid")
    }
}

struct ConnectionResult {
    ok: u64,
    non_2xx: u64,
    unexpected: u64,
    transport: u64,
    last_answer: Instant,
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
}

/// One keep-alive HTTP/1.1 connection: the request half, and the connection future that does the
/// I/O. The future is polled by the task that sends (see [`Client::exchange`]), not spawned, so a
/// request costs no wake-up of another task.
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    connection: Pin<Box<Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
}

impl Client {
    /// Opens one connection.
    pub async fn connect(target: &Target) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(target.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        Ok(Client {
            sender,
            connection: Box::pin(connection),
        })
    }

    /// Whether the server closed the connection while it was idle (a look, without waiting).
    fn closed(&mut self) -> bool {
        let mut context = Context::from_waker(Waker::noop());
        self.connection.as_mut().poll(&mut context).is_ready()
    }

    /// Sends one request and reads the whole answer: status and body.
    pub async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let sender = &mut self.sender;
        let exchange = async move {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::select! {
            answer = exchange => answer,
            ended = self.connection.as_mut() => match ended {
                Ok(()) => anyhow::bail!("the server closed the connection"),
                Err(error) => Err(error.into()),
            },
        }
    }
}

async fn drive(shared: Arc<Shared>, connection: usize) -> ConnectionResult {
    let plan = shared.plan;
    let mut result = ConnectionResult {
        ok: 0,
        non_2xx: 0,
        unexpected: 0,
        transport: 0,
        last_answer: shared.start,
        latency: new_histogram(),
        send_lag: new_histogram(),
    };
    let mut client: Option<Client> = None;
    let mut round = 0u64;
    loop {
        if plan.rate.is_none()
            && shared
                .deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
        {
            break;
        }
        let index = match plan.rate {
            None => shared.next.fetch_add(1, Ordering::Relaxed),
            Some(_) => {
                let index = connection as u64 + round * plan.connections as u64;
                round += 1;
                index
            }
        };
        if let Stop::Requests(total) = plan.stop {
            if index >= total {
                break;
            }
        }
        let started = match plan.rate {
            None => Instant::now(),
            Some(rate) => {
                let due = shared.start + Duration::from_secs_f64(index as f64 / rate);
                if shared.deadline.is_some_and(|deadline| due >= deadline) {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let lag = Instant::now().saturating_duration_since(due);
                let _ = result.send_lag.record((lag.as_micros() as u64).max(1));
                due
            }
        };
        if plan.rate.is_some() {
            // At a fixed rate `next` counts the indexes attempted: the highest one, plus one.
            shared.next.fetch_max(index + 1, Ordering::Relaxed);
        }
        let request = shared.build(index);
        if client.as_mut().is_some_and(Client::closed) {
            client = None;
        }
        let mut current = match client.take() {
            Some(current) => current,
            None => match Client::connect(&shared.target).await {
                Ok(current) => current,
                Err(error) => {
                    result.transport += 1;
                    shared.sample(format!("connect: {error:#}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match current.exchange(request).await {
            Ok((status, body)) => {
                let now = Instant::now();
                result.last_answer = now;
                let micros = now.saturating_duration_since(started).as_micros() as u64;
                let _ = result.latency.record(micros.max(1));
                if (200..300).contains(&status) && shared.workload.accepts(&body) {
                    result.ok += 1;
                } else if (200..300).contains(&status) {
                    result.unexpected += 1;
                    let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                    shared.sample(format!("status {status}, unexpected body: {text}"));
                } else {
                    result.non_2xx += 1;
                    let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                    shared.sample(format!("status {status}: {text}"));
                }
                client = Some(current);
            }
            Err(error) => {
                result.transport += 1;
                shared.sample(format!("request: {error:#}"));
            }
        }
    }
    result
}

/// Runs `workload` against `target` as `plan` says.
/// `server_pid`: the server's process, whose CPU time during the timed phase is reported.
pub async fn run(
    target: &Target,
    workload: Arc<dyn Workload>,
    plan: Plan,
    server_pid: Option<u32>,
) -> Outcome {
    let prebuild_started = std::time::Instant::now();
    let mut prebuilt = Vec::new();
    if workload.prebuild() {
        let wanted = match (plan.stop, plan.rate) {
            (Stop::Requests(total), _) => total,
            (Stop::After(duration), Some(rate)) => (duration.as_secs_f64() * rate).ceil() as u64,
            (Stop::After(_), None) => u64::MAX,
        };
        let mut bytes = 0usize;
        let mut index = 0u64;
        while index < wanted && bytes < plan.prebuild_bytes {
            let prepared = workload.request(index);
            bytes += prepared.body.len() + prepared.path.len() + 64;
            prebuilt.push(prepared);
            index += 1;
        }
    }
    let prebuild = prebuild_started.elapsed();
    let start = Instant::now() + Duration::from_millis(20);
    let shared = Arc::new(Shared {
        target: target.clone(),
        workload,
        prebuilt,
        plan,
        start,
        deadline: match plan.stop {
            Stop::After(duration) => Some(start + duration),
            Stop::Requests(_) => None,
        },
        next: AtomicU64::new(0),
        built_live: AtomicU64::new(0),
        samples: Mutex::new(Vec::new()),
    });
    tokio::time::sleep_until(start).await;
    let server_cpu = server_pid.and_then(crate::server::cpu_time);
    let bench_cpu = crate::server::cpu_time(std::process::id());
    let tasks: Vec<_> = (0..plan.connections.max(1))
        .map(|connection| tokio::spawn(drive(shared.clone(), connection)))
        .collect();
    let mut outcome = Outcome {
        ok: 0,
        non_2xx: 0,
        unexpected: 0,
        transport: 0,
        attempted: 0,
        elapsed: Duration::ZERO,
        latency: new_histogram(),
        send_lag: plan.rate.map(|_| new_histogram()),
        prebuild,
        prebuilt: shared.prebuilt.len() as u64,
        built_live: 0,
        error_samples: Vec::new(),
        server_cpu: None,
        bench_cpu: None,
    };
    let mut last_answer = start;
    for task in tasks {
        let result = task.await.expect("a connection task does not panic");
        outcome.ok += result.ok;
        outcome.non_2xx += result.non_2xx;
        outcome.unexpected += result.unexpected;
        outcome.transport += result.transport;
        outcome
            .latency
            .add(&result.latency)
            .expect("histograms with the same bounds merge");
        if let Some(lag) = outcome.send_lag.as_mut() {
            lag.add(&result.send_lag)
                .expect("histograms with the same bounds merge");
        }
        last_answer = last_answer.max(result.last_answer);
    }
    outcome.elapsed = last_answer.saturating_duration_since(start);
    let used = |before: Option<Duration>, pid: Option<u32>| {
        Some(
            pid.and_then(crate::server::cpu_time)?
                .saturating_sub(before?),
        )
    };
    outcome.server_cpu = used(server_cpu, server_pid);
    outcome.bench_cpu = used(bench_cpu, Some(std::process::id()));
    // Each connection takes one index past the request budget before it stops.
    outcome.attempted = match plan.stop {
        Stop::Requests(total) => total.min(shared.next.load(Ordering::Relaxed)),
        Stop::After(_) => shared.next.load(Ordering::Relaxed),
    };
    outcome.built_live = shared.built_live.load(Ordering::Relaxed);
    outcome.error_samples = std::mem::take(&mut *shared.samples.lock().unwrap());
    outcome
}
