//! Wiring only: opens the store, builds the services over it, registers them and the routes
//! with their limits, and binds the listener. Nothing here is imported by the code it wires.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::error::{PathError, QueryPayloadError};
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpRequest, HttpServer};
use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing_actix_web::TracingLogger;

use crate::auth::Gate;
use crate::clock::Clock;
use crate::conversions::{self, DeliveryPolicy};
use crate::error::{ApiError, Code};
use crate::graph::GraphClient;
use crate::ingest;
use crate::json_body;
use crate::metrics::Metrics;
use crate::routes;
use crate::settings::{Settings, StoreEngine};
use crate::store::{RedbStore, SledStore, Store};
use crate::telemetry;

/// Meta sends webhook bodies of up to 3 MB.
pub const WEBHOOK_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// The running service: the HTTP server, the outbox worker, and the store they share.
pub struct Application {
    address: std::net::SocketAddr,
    server: Server,
    store: Store,
    conversions: Arc<conversions::Service>,
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
        let cache_bytes = settings.cache_bytes();
        let engine = resolve_engine(settings.store_engine, &settings.data_dir);
        let store =
            tokio::task::spawn_blocking(move || -> Result<Store, crate::store::StoreError> {
                Ok(match engine {
                    StoreEngine::Sled => Arc::new(SledStore::open_with(
                        &data_dir,
                        min_free_bytes,
                        cache_bytes,
                    )?),
                    StoreEngine::Redb | StoreEngine::Auto => Arc::new(RedbStore::open_with(
                        &data_dir,
                        min_free_bytes,
                        cache_bytes,
                    )?),
                })
            })
            .await
            .context("the store task panicked")?
            .with_context(|| format!("cannot open the store in {}", settings.data_dir.display()))?;
        let listener = TcpListener::bind(settings.listen)
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let address = listener.local_addr()?;
        let workers = match settings.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let api_body_limit = settings.api_body_limit;

        let metrics = Arc::new(Metrics::default());
        let graph = GraphClient::new(&settings).context("cannot build the Graph API client")?;
        let conversions = Arc::new(conversions::Service::new(
            store.clone(),
            graph,
            clock.clone(),
            DeliveryPolicy::from_settings(&settings),
            metrics.clone(),
        ));
        let ingest = Arc::new(ingest::Service::new(
            store.clone(),
            clock.clone(),
            settings.app_secrets.clone(),
            settings.verify_token.clone(),
            settings.attribution_window_secs(),
            metrics.clone(),
            conversions.clone(),
        ));
        let admin = web::Data::new(routes::admin::Admin {
            store: store.clone(),
            clock,
            ingest: ingest.clone(),
        });
        let gate = web::Data::new(Gate {
            store: store.clone(),
            admin_token: settings.admin_token.clone(),
        });
        let store_data = web::Data::new(store.clone());
        let metrics_data = web::Data::from(metrics);
        let ingest_data = web::Data::from(ingest);
        let conversions_data = web::Data::from(conversions.clone());

        let shutdown = CancellationToken::new();
        let outbox_worker = tokio::spawn(conversions.clone().run_outbox(shutdown.clone()));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(store_data.clone())
                .app_data(gate.clone())
                .app_data(metrics_data.clone())
                .app_data(ingest_data.clone())
                .app_data(conversions_data.clone())
                .app_data(admin.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(api_body_limit)
                        .error_handler(json_body::json_error),
                )
                .app_data(web::QueryConfig::default().error_handler(query_error))
                .app_data(web::PathConfig::default().error_handler(path_error))
                .wrap(from_fn(telemetry::answer_request))
                .wrap(TracingLogger::<telemetry::RequestSpan>::new())
                .configure(configure_routes)
        })
        .workers(workers)
        .shutdown_timeout(30)
        .listen(listener)?
        .run();
        Ok(Self {
            address,
            server,
            store,
            conversions,
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

    /// The conversions service, so tests can run an outbox pass when they choose.
    pub fn conversions(&self) -> Arc<conversions::Service> {
        self.conversions.clone()
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
        let store = self.store.clone();
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
                std::mem::forget((self.store, self.conversions));
            }
            Err(error) => tracing::error!(
                %error,
                "stopped; the final flush panicked, but everything acknowledged was already durable"
            ),
        }
        served.context("the HTTP server failed")
    }
}

/// The engine to open: the one named, or with `auto` the one whose store the data directory
/// already holds (a sled store keeps working, with a warning to migrate), and redb for a new one.
fn resolve_engine(setting: StoreEngine, data_dir: &std::path::Path) -> StoreEngine {
    if setting != StoreEngine::Auto {
        return setting;
    }
    match crate::store::existing_engine(data_dir) {
        Some(crate::store::Engine::Sled) => {
            tracing::warn!(
                data_dir = %data_dir.display(),
                "this data directory holds a sled store, so it is opened with sled; sled can lose \
                 acknowledged writes in a power cut (RELIABILITY.md). Stop the server, run \
                 `ctwa-relay migrate-store --from <this dir> --to <new dir>` and point \
                 CTWA_DATA_DIR at the new directory (or set CTWA_STORE_ENGINE=sled to keep sled)"
            );
            StoreEngine::Sled
        }
        Some(crate::store::Engine::Redb) | None => StoreEngine::Redb,
    }
}

pub fn configure_routes(config: &mut web::ServiceConfig) {
    config
        .route("/healthz", web::get().to(routes::health::healthz))
        .route("/readyz", web::get().to(routes::health::readyz))
        .route("/metrics", web::get().to(routes::health::metrics))
        .route("/openapi.json", web::get().to(crate::api::openapi))
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
    ApiError::new(Code::InvalidQuery)
        .message(error.to_string())
        .into()
}

fn path_error(error: PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::new(Code::InvalidPath)
        .message(error.to_string())
        .into()
}
