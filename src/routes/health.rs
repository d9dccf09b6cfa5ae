use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::error::{ApiError, Code};
use crate::startup::AppState;

/// Alive unless the store failed a write or flush and a fresh probe still fails: sled 0.34 keeps
/// an I/O error for good, so a supervisor restarting the process is the way back.
pub async fn healthz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    match state.store.check_alive().await {
        Ok(()) => Ok(HttpResponse::Ok().json(json!({"status": "ok"}))),
        Err(error) => {
            crate::error::log_store_failure(&error, "liveness check failed: the store is failed");
            Err(ApiError::new(Code::StoreFailed))
        }
    }
}

/// Ready when the store can take a write, make it durable and read it back.
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    match state.store.check_ready().await {
        Ok(()) => Ok(HttpResponse::Ok().json(json!({"status": "ready"}))),
        Err(error) => {
            crate::error::log_store_failure(&error, "readiness check failed");
            Err(ApiError::new(Code::StoreUnavailable)
                .message("the store cannot write, flush and read back"))
        }
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// The answer for every path no route matches.
pub async fn not_found(request: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(Code::NotFound).message(format!(
        "no route for {} {}",
        request.method(),
        request.path()
    )))
}
