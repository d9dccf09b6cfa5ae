//! Building the application: the store, the state, the routes and their limits, the listener.

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::error::{PathError, QueryPayloadError};
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpRequest, HttpServer};
use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::conversions::outbox;
use crate::error::{ApiError, Code};
use crate::graph::GraphClient;
use crate::json_body;
use crate::metrics::Metrics;
use crate::routes;
use crate::settings::Settings;
use crate::store::Store;
use crate::telemetry;

/// Meta sends webhook bodies of up to 3 MB.
pub const WEBHOOK_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// Everything handlers share.
pub struct AppState {
    pub settings: Settings,
    pub store: Store,
    pub metrics: Metrics,
    pub clock: Clock,
    pub graph: GraphClient,
    /// Wakes the outbox worker before its next poll.
    pub outbox_wakeup: tokio::sync::Notify,
}

pub struct Application {
    address: std::net::SocketAddr,
    server: Server,
    state: web::Data<AppState>,
    shutdown: CancellationToken,
    outbox_worker: tokio::task::JoinHandle<()>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Clock::system()).await
    }

    /// Like [`Application::build`] with a chosen clock (tests move time forward with it).
    pub async fn build_with_clock(settings: Settings, clock: Clock) -> anyhow::Result<Self> {
        let data_dir = settings.data_dir.clone();
        let min_free_bytes = settings.min_free_bytes();
        let store = tokio::task::spawn_blocking(move || {
            Store::open_with_free_space(&data_dir, min_free_bytes)
        })
        .await
        .context("the store task panicked")?
        .with_context(|| format!("cannot open the store in {}", settings.data_dir.display()))?;
        let listener = TcpListener::bind(&settings.listen)
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let address = listener.local_addr()?;
        let workers = match settings.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let api_body_limit = settings.api_body_limit;
        let graph = GraphClient::new(&settings).context("cannot build the Graph API client")?;
        let state = web::Data::new(AppState {
            settings,
            store,
            metrics: Metrics::default(),
            clock,
            graph,
            outbox_wakeup: tokio::sync::Notify::new(),
        });
        let gate = web::Data::new(crate::auth::Gate {
            store: state.store.clone(),
            admin_token: state.settings.admin_token.clone(),
        });
        let shutdown = CancellationToken::new();
        let outbox_worker = tokio::spawn(outbox::run(state.clone().into_inner(), shutdown.clone()));
        let server_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(server_state.clone())
                .app_data(gate.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(api_body_limit)
                        .error_handler(json_body::json_error),
                )
                .app_data(web::QueryConfig::default().error_handler(query_error))
                .app_data(web::PathConfig::default().error_handler(path_error))
                .wrap(from_fn(telemetry::request_context))
                .configure(configure_routes)
        })
        .workers(workers)
        .shutdown_timeout(30)
        .listen(listener)?
        .run();
        Ok(Self {
            address,
            server,
            state,
            shutdown,
            outbox_worker,
        })
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Serves until SIGTERM or SIGINT: actix drains in-flight requests, then background work is
    /// stopped and the store flushed one last time.
    ///
    /// A failed final flush (a full or read-only disk) is logged and the process still exits 0:
    /// every request answered 2xx was flushed before its answer, so nothing acknowledged depends
    /// on this flush, and a supervisor should not treat the stop as a crash.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let served = self.server.await;
        self.shutdown.cancel();
        if let Err(error) = self.outbox_worker.await {
            tracing::error!(%error, "the outbox worker panicked");
        }
        let store = self.state.store.clone();
        let flushed = tokio::task::spawn_blocking(move || store.flush_blocking()).await;
        match flushed {
            Ok(Ok(())) => tracing::info!("stopped; the store is flushed"),
            Ok(Err(error)) => {
                tracing::error!(
                    error = %crate::error::error_chain(&error),
                    "stopped; the final flush failed, but everything acknowledged was already \
                     durable (each write is flushed before its answer), so nothing acknowledged \
                     is lost"
                );
                // sled logs one more error per tree when a tree is dropped after a failed
                // flush; nothing more can be saved, so the process ends without those drops.
                std::mem::forget(self.state);
            }
            Err(error) => tracing::error!(
                %error,
                "stopped; the final flush panicked, but everything acknowledged was already durable"
            ),
        }
        served.context("the HTTP server failed")
    }
}

pub fn configure_routes(config: &mut web::ServiceConfig) {
    config
        .route("/healthz", web::get().to(routes::health::healthz))
        .route("/readyz", web::get().to(routes::health::readyz))
        .route("/metrics", web::get().to(routes::health::metrics))
        .service(
            web::resource("/webhooks/whatsapp")
                .app_data(web::PayloadConfig::new(WEBHOOK_BODY_LIMIT))
                .route(web::get().to(routes::webhook::handshake))
                .route(web::post().to(routes::webhook::receive)),
        )
        .service(
            web::scope("/v1")
                .service(
                    web::resource("/admin/accounts")
                        .route(web::get().to(routes::admin::list_accounts))
                        .route(web::post().to(routes::admin::create_account)),
                )
                .service(
                    web::resource("/admin/accounts/{id}")
                        .route(web::get().to(routes::admin::get_account))
                        .route(web::patch().to(routes::admin::update_account))
                        .route(web::delete().to(routes::admin::delete_account)),
                )
                .service(
                    web::resource("/admin/api-keys")
                        .route(web::get().to(routes::admin::list_keys))
                        .route(web::post().to(routes::admin::create_key)),
                )
                .service(
                    web::resource("/admin/api-keys/{id}")
                        .route(web::delete().to(routes::admin::revoke_key)),
                )
                .route(
                    "/whatsapp/attribution",
                    web::get().to(routes::attribution::attribution),
                )
                .service(
                    web::resource("/whatsapp/conversions")
                        .route(web::get().to(routes::conversions::history))
                        .route(web::post().to(routes::conversions::send)),
                )
                .service(
                    web::resource("/whatsapp/dataset")
                        .route(web::get().to(routes::conversions::get_dataset))
                        .route(web::post().to(routes::conversions::provision_dataset)),
                )
                .route(
                    "/whatsapp/conversations/{id}",
                    web::get().to(routes::attribution::conversation),
                ),
        )
        .default_service(web::to(routes::health::not_found));
}

fn query_error(error: QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::new(Code::InvalidQuery).message(error.to_string()).into()
}

fn path_error(error: PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::new(Code::InvalidPath).message(error.to_string()).into()
}
