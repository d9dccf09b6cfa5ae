use std::collections::HashMap;

use actix_web::{web, HttpResponse};

use crate::api::errors::ErrorBody;
use crate::error::{ApiError, Code};
use crate::ingest;
use crate::webhook::VerifiedWebhook;

/// Meta's subscription handshake (SPEC §4.2).
#[utoipa::path(
    get,
    path = "/webhooks/whatsapp",
    tag = "webhook",
    params(
        ("hub.mode" = Option<String>, Query, description = "`subscribe`."),
        ("hub.verify_token" = Option<String>, Query, description = "Must equal CTWA_VERIFY_TOKEN."),
        ("hub.challenge" = Option<String>, Query, description = "Echoed back on success."),
    ),
    responses(
        (status = 200, description = "`hub.challenge`, exactly.", body = String, content_type = "text/plain"),
        (status = 403, description = "The verify token or mode does not match (`forbidden`).", body = ErrorBody),
    ),
)]
pub async fn handshake(
    service: web::Data<ingest::Service>,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let challenge = service.handshake(
        query.get("hub.mode").map(String::as_str),
        query.get("hub.verify_token").map(String::as_str),
        query.get("hub.challenge").map(String::as_str),
    );
    match challenge {
        Some(challenge) => Ok(HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(challenge.to_string())),
        None => Err(ApiError::new(Code::Forbidden).message(
            "the verify token or hub.mode does not match this server's CTWA_VERIFY_TOKEN",
        )),
    }
}

/// A signed webhook: journaled, applied, durable, then answered exactly 200 (SPEC §4.3).
#[utoipa::path(
    post,
    path = "/webhooks/whatsapp",
    tag = "webhook",
    params(
        ("X-Hub-Signature-256" = String, Header, description = "`sha256=<hex>`: HMAC-SHA256 of the raw body with an app secret."),
    ),
    request_body(content = Object, description = "Meta's webhook payload, verified before it is read; any verified body is journaled, even one that is not JSON.", content_type = "application/json"),
    responses(
        (status = 200, description = "Journaled and processed (always exactly 200, never 201 or 204); empty body."),
        (status = 400, description = "The body could not be read (`unreadable_body`).", body = ErrorBody),
        (status = 401, description = "The signature is missing or wrong (`missing_signature`, `invalid_signature`); nothing is stored.", body = ErrorBody),
        (status = 413, description = "Larger than 4 MiB (`payload_too_large`).", body = ErrorBody),
        (status = 503, description = "No app secret is configured (`webhook_not_configured`), or the store cannot take the body (`store_unavailable`); Meta retries.", body = ErrorBody),
    ),
)]
pub async fn receive(
    service: web::Data<ingest::Service>,
    VerifiedWebhook(body): VerifiedWebhook,
) -> Result<HttpResponse, ApiError> {
    service.ingest(body).await?;
    Ok(HttpResponse::Ok().finish())
}
