//! The in-process Graph API stand-in for `convert`: it answers every request at once, on its own
//! thread and runtime (so the load generator's tasks do not delay it), with Meta's success body
//! (`fixtures/meta/capi_03_response_success.json`), and counts what it received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const SUCCESS: &str = r#"{"events_received":1,"messages":[],"fbtrace_id":"BENCH-TRACE"}"#;

pub struct GraphStandIn {
    pub addr: SocketAddr,
    /// `POST …/events` requests answered.
    events: Arc<AtomicU64>,
}

impl GraphStandIn {
    /// Listens on loopback (`port` 0: any free port) and serves until the process ends.
    pub fn start(port: u16) -> anyhow::Result<GraphStandIn> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let events = Arc::new(AtomicU64::new(0));
        let counter = events.clone();
        std::thread::Builder::new()
            .name("graph-stand-in".to_string())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the stand-in's runtime starts");
                runtime.block_on(serve(listener, counter));
            })?;
        Ok(GraphStandIn { addr, events })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

async fn serve(listener: std::net::TcpListener, events: Arc<AtomicU64>) {
    let listener = TcpListener::from_std(listener).expect("the listener is non-blocking");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let events = events.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let events = events.clone();
                async move { Ok::<_, Infallible>(answer(request, &events).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(request: Request<Incoming>, events: &AtomicU64) -> Response<Full<Bytes>> {
    let is_event =
        request.method() == hyper::Method::POST && request.uri().path().ends_with("/events");
    // Read the whole body, as Meta would, before answering.
    let read = request.into_body().collect().await;
    let (status, body) = match (is_event, read) {
        (true, Ok(_)) => {
            events.fetch_add(1, Ordering::Relaxed);
            (StatusCode::OK, SUCCESS)
        }
        (false, Ok(_)) => (
            StatusCode::NOT_FOUND,
            r#"{"error":{"message":"the bench's Graph stand-in only answers POST /{version}/{dataset}/events","type":"GraphMethodException","code":100}}"#,
        ),
        (_, Err(_)) => (StatusCode::BAD_REQUEST, "{}"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
