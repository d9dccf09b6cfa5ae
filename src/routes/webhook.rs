use std::collections::HashMap;

use actix_web::{web, HttpResponse};

use crate::error::{ApiError, Code};
use crate::startup::AppState;
use crate::webhook::{parse_webhook, VerifiedWebhook};

/// Meta's subscription handshake (SPEC §4.2).
pub async fn handshake(
    state: web::Data<AppState>,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let mode = query.get("hub.mode").map(String::as_str);
    let token = query.get("hub.verify_token");
    let challenge = query.get("hub.challenge");
    match (&state.settings.verify_token, mode, token, challenge) {
        (Some(expected), Some("subscribe"), Some(token), Some(challenge))
            if expected.matches(token) =>
        {
            Ok(HttpResponse::Ok()
                .content_type("text/plain; charset=utf-8")
                .body(challenge.clone()))
        }
        _ => Err(ApiError::new(Code::Forbidden).message(
            "the verify token or hub.mode does not match this server's CTWA_VERIFY_TOKEN",
        )),
    }
}

/// A signed webhook: journaled, applied, flushed, then answered exactly 200 (SPEC §4.3).
pub async fn receive(
    state: web::Data<AppState>,
    VerifiedWebhook(body): VerifiedWebhook,
) -> Result<HttpResponse, ApiError> {
    let received_at = state.clock.now_secs();
    let mut report = state
        .store
        .record_webhook(
            body,
            received_at,
            parse_webhook,
            state.settings.attribution_window_secs(),
        )
        .await?;
    let matched = std::mem::take(&mut report.matched_automatic_events);
    crate::conversions::forward_automatic_events(&state, matched).await?;
    state.store.durable().await?;
    state.metrics.webhook_ingested(&report);
    if report.unparseable {
        tracing::warn!(
            journal_seq = report.journal_seq,
            "a signed webhook body is not JSON shaped like a webhook; journaled and acknowledged"
        );
    }
    if report.unrouted_changes > 0 {
        tracing::info!(
            journal_seq = report.journal_seq,
            changes = report.unrouted_changes,
            "webhook changes for a phone_number_id without an account are held until it is added"
        );
    }
    Ok(HttpResponse::Ok().finish())
}
