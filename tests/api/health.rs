use serde_json::Value;

use crate::helpers::{spawn_app, ADMIN_TOKEN};

#[tokio::test]
async fn healthz_and_readyz_answer_ok() {
    let app = spawn_app().await;
    let health = app.get("/healthz", None).await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn unknown_routes_use_the_error_envelope() {
    let app = spawn_app().await;
    let response = app.get("/no/such/route", None).await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    assert!(body["error"].as_str().unwrap().contains("/no/such/route"));
}

#[tokio::test]
async fn a_wrong_method_uses_the_error_envelope() {
    let app = spawn_app().await;
    let response = app
        .client
        .put(app.url("/webhooks/whatsapp"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed");
}

#[tokio::test]
async fn malformed_json_uses_the_error_envelope() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/v1/admin/accounts"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"phoneNumberId\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "malformed_json");
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_valid_one_is_reused() {
    let app = spawn_app().await;
    let generated = app.get("/healthz", None).await;
    assert!(!generated.headers()["x-request-id"].is_empty());
    let reused = app
        .client
        .get(app.url("/no/such/route"))
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(reused.headers()["x-request-id"], "req-123");
    let replaced = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(replaced.headers()["x-request-id"], "bad id with spaces");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let app = spawn_app().await;
    app.get("/healthz", None).await;
    let metrics = app.metrics().await;
    assert!(metrics.contains("# TYPE ctwa_webhooks_received_total counter"));
    assert!(metrics.contains("ctwa_http_request_duration_seconds_count{route=\"/healthz\"} "));
}

#[tokio::test]
async fn api_bodies_over_the_limit_or_nested_too_deep_are_refused() {
    let app = crate::helpers::spawn_app().await;
    let huge = serde_json::json!({"accountId": "a", "eventName": "LeadSubmitted", "eventId": "x".repeat(70 * 1024)});
    let response = app
        .send_json(
            reqwest::Method::POST,
            "/v1/whatsapp/conversions",
            Some(ADMIN_TOKEN),
            &huge,
        )
        .await;
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "payload_too_large"
    );

    let nested = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let response = app
        .client
        .post(app.url("/v1/whatsapp/conversions"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(nested)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
}
