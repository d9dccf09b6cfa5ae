//! A fake Graph API that can misbehave: hand-written HTTP/1.1 over a tokio `TcpListener`, so it
//! can refuse connections, answer late, reset, or truncate, which a well-behaved mock server
//! cannot. It records every events POST it receives and can be switched between modes while
//! ctwa-relay talks to it. It keeps its port for its whole life, so a restarted ctwa-relay finds
//! it at the same `CTWA_GRAPH_URL`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify};

use crate::server::KillSwitch;

/// How the fake answers an events POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 `{"events_received":1,"fbtrace_id":…}`.
    Ok,
    /// No listener: connections are refused, and idle keep-alive connections are closed. A
    /// request already read when the switch happens gets 503 and `Connection: close`.
    Down,
    /// Takes the event, then answers 200 only after this delay (longer than ctwa-relay's
    /// `CTWA_GRAPH_TIMEOUT_MS`, so ctwa-relay gives up first).
    Slow(Duration),
    /// Reads the request, then resets the connection without answering.
    Reset,
    /// 200 whose body stops short of its `Content-Length`, then the connection closes.
    Truncated,
    /// 200 with an HTML body.
    NotJson,
    /// 200 `{"events_received":0}`: Meta counted nothing.
    ZeroReceived,
    /// 429 with Meta's transient code 80004 (too many calls).
    RateLimited,
    /// 500 with Meta's transient code 2 (service temporarily unavailable).
    ServerError,
    /// Answers 200, but first SIGKILLs the armed ctwa-relay process (see
    /// [`FakeGraph::arm_kill`]), so it dies after Meta took the event and before it can store the
    /// outcome.
    KillAfterSuccess,
}

impl Mode {
    /// Whether Meta took, or may have taken, the event when it answers this way: these are the
    /// receptions that count as deliveries when looking for duplicates.
    pub fn takes_event(self) -> bool {
        match self {
            Mode::Ok
            | Mode::Slow(_)
            | Mode::Reset
            | Mode::Truncated
            | Mode::NotJson
            | Mode::KillAfterSuccess => true,
            Mode::Down | Mode::ZeroReceived | Mode::RateLimited | Mode::ServerError => false,
        }
    }
}

/// One event of one events POST, as the fake received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub dataset: String,
    pub event_name: String,
    pub event_id: String,
    pub at: Instant,
    pub mode: Mode,
}

impl Received {
    pub fn taken(&self) -> bool {
        self.mode.takes_event()
    }
}

#[derive(Debug, Clone)]
struct ModeState {
    /// The mode of every request once `next` is empty.
    mode: Mode,
    /// Modes for the next requests, one each, before `mode` applies again.
    next: VecDeque<Mode>,
}

struct Shared {
    modes: watch::Sender<ModeState>,
    received: Mutex<Vec<Received>>,
    kill: Mutex<Option<KillSwitch>>,
    kills: AtomicUsize,
    killed: Notify,
    trace: AtomicU64,
}

impl Shared {
    /// The mode for the request just read.
    fn take_mode(&self) -> Mode {
        let mut mode = Mode::Ok;
        self.modes
            .send_if_modified(|state| match state.next.pop_front() {
                Some(next) => {
                    mode = next;
                    true
                }
                None => {
                    mode = state.mode;
                    false
                }
            });
        mode
    }

    fn trace_id(&self) -> String {
        format!("FAKE-{}", self.trace.fetch_add(1, Ordering::Relaxed))
    }
}

pub struct FakeGraph {
    shared: Arc<Shared>,
    address: SocketAddr,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// A listener on `address` that can be bound again at once after it is closed.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

impl FakeGraph {
    /// Listens on a random loopback port, in mode [`Mode::Ok`].
    pub async fn start() -> FakeGraph {
        let listener = listen("127.0.0.1:0".parse().unwrap()).expect("the fake Graph API binds");
        let address = listener.local_addr().unwrap();
        let (modes, _) = watch::channel(ModeState {
            mode: Mode::Ok,
            next: VecDeque::new(),
        });
        let shared = Arc::new(Shared {
            modes,
            received: Mutex::new(Vec::new()),
            kill: Mutex::new(None),
            kills: AtomicUsize::new(0),
            killed: Notify::new(),
            trace: AtomicU64::new(1),
        });
        let accept_loop = tokio::spawn(accept_loop(shared.clone(), address, listener));
        FakeGraph {
            shared,
            address,
            accept_loop,
        }
    }

    /// The base URL for `CTWA_GRAPH_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every later request is answered in `mode` (after any queued with [`FakeGraph::then`]).
    pub fn set_mode(&self, mode: Mode) {
        self.shared.modes.send_modify(|state| state.mode = mode);
    }

    /// The next request, after those already queued, is answered in `mode`; later ones in the
    /// mode set with [`FakeGraph::set_mode`].
    pub fn then(&self, mode: Mode) {
        self.shared
            .modes
            .send_modify(|state| state.next.push_back(mode));
    }

    /// Forgets the modes queued with [`FakeGraph::then`].
    pub fn clear(&self) {
        self.shared.modes.send_modify(|state| state.next.clear());
    }

    /// The process [`Mode::KillAfterSuccess`] kills (once; each kill disarms it).
    pub fn arm_kill(&self, switch: KillSwitch) {
        *self.shared.kill.lock().unwrap() = Some(switch);
    }

    pub fn disarm_kill(&self) {
        self.shared.kill.lock().unwrap().take();
    }

    /// How many times [`Mode::KillAfterSuccess`] killed the armed process.
    pub fn kills(&self) -> usize {
        self.shared.kills.load(Ordering::SeqCst)
    }

    /// Returns once [`Mode::KillAfterSuccess`] has killed the armed process, counting from
    /// `seen` kills.
    pub async fn killed_after(&self, seen: usize) {
        loop {
            let notified = self.shared.killed.notified();
            if self.kills() > seen {
                return;
            }
            notified.await;
        }
    }

    /// Every event received so far, in order of arrival.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// The receptions of one event id, in order of arrival.
    pub fn received_event(&self, event_id: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|received| received.event_id == event_id)
            .collect()
    }
}

async fn accept_loop(shared: Arc<Shared>, address: SocketAddr, listener: TcpListener) {
    let mut modes = shared.modes.subscribe();
    let mut listener = Some(listener);
    loop {
        let down = modes.borrow_and_update().mode == Mode::Down;
        if down {
            // Closing the listener makes new connections fail with "connection refused".
            listener = None;
        } else if listener.is_none() {
            match listen(address) {
                Ok(bound) => listener = Some(bound),
                Err(error) => {
                    eprintln!(
                        "fake Graph API: cannot listen on {address} again ({error}); retrying"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        match &listener {
            Some(bound) => tokio::select! {
                accepted = bound.accept() => {
                    if let Ok((stream, _)) = accepted {
                        tokio::spawn(connection(shared.clone(), stream));
                    }
                }
                changed = modes.changed() => if changed.is_err() { return },
            },
            None => {
                if modes.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Takes one complete request off the front of `buffer`, if it holds one.
fn parse_request(buffer: &mut Vec<u8>) -> Result<Option<Request>, String> {
    let Some(head_end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let path = request_line.next().unwrap_or_default().to_string();
    let mut content_length = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        if name == "content-length" {
            content_length = value
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
        }
        if name == "transfer-encoding" {
            return Err("the fake Graph API reads Content-Length bodies only".into());
        }
    }
    let body_start = head_end + 4;
    if buffer.len() < body_start + content_length {
        return Ok(None);
    }
    let body = buffer[body_start..body_start + content_length].to_vec();
    buffer.drain(..body_start + content_length);
    Ok(Some(Request { method, path, body }))
}

async fn connection(shared: Arc<Shared>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut modes = shared.modes.subscribe();
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let request = loop {
            match parse_request(&mut buffer) {
                Ok(Some(request)) => break request,
                Ok(None) => {}
                Err(message) => {
                    let _ =
                        write_response(&mut stream, 400, "text/plain", message.as_bytes(), false)
                            .await;
                    return;
                }
            }
            tokio::select! {
                read = stream.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(count) => buffer.extend_from_slice(&chunk[..count]),
                },
                // Going down closes idle keep-alive connections, as a stopped server would.
                changed = modes.changed(), if buffer.is_empty() => {
                    if changed.is_err() || modes.borrow_and_update().mode == Mode::Down {
                        return;
                    }
                }
            }
        };
        if !respond(&shared, &mut stream, request).await {
            return;
        }
    }
}

/// Writes a whole response; `keep_alive: false` announces `Connection: close`.
async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    let mut response = head.into_bytes();
    response.extend_from_slice(body);
    stream.write_all(&response).await?;
    stream.flush().await
}

fn meta_error(code: i64, subcode: Option<i64>, message: &str, trace_id: &str) -> Vec<u8> {
    let mut error = json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "is_transient": true,
        "fbtrace_id": trace_id,
    });
    if let Some(subcode) = subcode {
        error["error_subcode"] = json!(subcode);
    }
    serde_json::to_vec(&json!({ "error": error })).unwrap()
}

/// Answers one request; false when the connection must close.
async fn respond(shared: &Shared, stream: &mut TcpStream, request: Request) -> bool {
    // `/{version}/{dataset}/events`
    let segments: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    let [_, dataset, "events"] = segments.as_slice() else {
        let body = meta_error(
            100,
            None,
            "the fake Graph API serves events POSTs only",
            "FAKE",
        );
        return write_response(stream, 404, "application/json", &body, true)
            .await
            .is_ok();
    };
    if request.method != "POST" {
        let body = meta_error(100, None, "events are POSTed", "FAKE");
        return write_response(stream, 404, "application/json", &body, true)
            .await
            .is_ok();
    }
    let mode = shared.take_mode();
    let events: Vec<(String, String)> = serde_json::from_slice::<Value>(&request.body)
        .ok()
        .and_then(|body| body["data"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|event| {
            (
                event["event_name"].as_str().unwrap_or_default().to_string(),
                event["event_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let at = Instant::now();
    shared
        .received
        .lock()
        .unwrap()
        .extend(events.iter().map(|(event_name, event_id)| Received {
            dataset: dataset.to_string(),
            event_name: event_name.clone(),
            event_id: event_id.clone(),
            at,
            mode,
        }));
    let trace_id = shared.trace_id();
    let received = |count: usize| {
        serde_json::to_vec(&json!({
            "events_received": count,
            "messages": [],
            "fbtrace_id": trace_id,
        }))
        .unwrap()
    };
    match mode {
        Mode::Ok => write_response(
            stream,
            200,
            "application/json",
            &received(events.len()),
            true,
        )
        .await
        .is_ok(),
        Mode::Down => {
            let body = meta_error(2, None, "Service temporarily unavailable", &trace_id);
            let _ = write_response(stream, 503, "application/json", &body, false).await;
            false
        }
        Mode::Slow(delay) => {
            tokio::time::sleep(delay).await;
            write_response(
                stream,
                200,
                "application/json",
                &received(events.len()),
                true,
            )
            .await
            .is_ok()
        }
        Mode::Reset => {
            // SO_LINGER 0: closing sends a TCP reset instead of a clean end of stream.
            let _ = stream.set_zero_linger();
            false
        }
        Mode::Truncated => {
            let body = received(events.len());
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let mut partial = head.into_bytes();
            partial.extend_from_slice(&body[..body.len() / 2]);
            let _ = stream.write_all(&partial).await;
            let _ = stream.flush().await;
            let _ = stream.shutdown().await;
            false
        }
        Mode::NotJson => write_response(
            stream,
            200,
            "text/html",
            b"<html><body>Service OK</body></html>",
            true,
        )
        .await
        .is_ok(),
        Mode::ZeroReceived => write_response(stream, 200, "application/json", &received(0), true)
            .await
            .is_ok(),
        Mode::RateLimited => {
            let body = meta_error(
                80004,
                Some(2446079),
                "(#80004) There have been too many calls to this ad-account. Wait a bit and try again.",
                &trace_id,
            );
            write_response(stream, 429, "application/json", &body, true)
                .await
                .is_ok()
        }
        Mode::ServerError => {
            let body = meta_error(
                2,
                None,
                "An unexpected error has occurred. Please retry your request later.",
                &trace_id,
            );
            write_response(stream, 500, "application/json", &body, true)
                .await
                .is_ok()
        }
        Mode::KillAfterSuccess => {
            // The kill lands before the answer leaves, so ctwa-relay never reads it: Meta has the
            // event, ctwa-relay cannot have stored that it does.
            if let Some(switch) = shared.kill.lock().unwrap().take() {
                switch.kill();
                shared.kills.fetch_add(1, Ordering::SeqCst);
                shared.killed.notify_waiters();
            }
            let _ = write_response(
                stream,
                200,
                "application/json",
                &received(events.len()),
                true,
            )
            .await;
            false
        }
    }
}
