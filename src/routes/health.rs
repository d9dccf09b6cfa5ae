use actix_web::{web, HttpResponse};

use crate::api::errors::ErrorBody;
use crate::api::StatusBody;
use crate::error::{ApiError, Code};
use crate::metrics::Metrics;
use crate::store::Store;

/// Alive unless the store failed and cannot heal by itself: sled 0.34 keeps an I/O error for
/// good, and redb heals by opening its file again unless that fails for another reason than
/// space (a read-only file system); then a supervisor restarting the process is the way back.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "Alive: `{\"status\": \"ok\"}`.", body = StatusBody),
        (status = 503, description = "The store failed and cannot heal by itself (`store_failed`): sled after any disk error, redb when its file cannot be opened again; restart the process once the disk is writable.", body = ErrorBody),
    ),
)]
pub async fn healthz(store: web::Data<Store>) -> Result<HttpResponse, ApiError> {
    match store.check_alive().await {
        Ok(()) => Ok(HttpResponse::Ok().json(StatusBody { status: "ok" })),
        Err(error) => {
            crate::error::log_store_failure(&error, "liveness check failed: the store is failed");
            Err(ApiError::new(Code::StoreFailed))
        }
    }
}

/// Ready when the store can take a write, make it durable and read it back.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: `{\"status\": \"ready\"}`.", body = StatusBody),
        (status = 503, description = "The store cannot write, flush and read back, or its disk has less free space than `CTWA_MIN_FREE_MB` (`store_unavailable`).", body = ErrorBody),
    ),
)]
pub async fn readyz(store: web::Data<Store>) -> Result<HttpResponse, ApiError> {
    match store.check_ready().await {
        Ok(()) => Ok(HttpResponse::Ok().json(StatusBody { status: "ready" })),
        Err(error) => {
            crate::error::log_store_failure(&error, "readiness check failed");
            let message = match error {
                crate::store::StoreError::LowFreeSpace { .. } => {
                    "the disk holding the store has less free space than CTWA_MIN_FREE_MB; \
                     writes that do not fit fail (the figures are in the server log)"
                }
                _ => "the store cannot write, flush and read back",
            };
            Err(ApiError::new(Code::StoreUnavailable).message(message))
        }
    }
}

pub async fn metrics(metrics: web::Data<Metrics>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(crate::metrics::CONTENT_TYPE)
        .body(metrics.render())
}

/// The answer for every path no route matches.
pub async fn not_found(request: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(Code::NotFound).message(format!(
        "no route for {} {}",
        request.method(),
        request.path()
    )))
}
