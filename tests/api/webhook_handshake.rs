use serde_json::Value;

use crate::helpers::{spawn_app, spawn_app_with, VERIFY_TOKEN};

#[tokio::test]
async fn the_right_token_gets_the_challenge_as_plain_text() {
    let app = spawn_app().await;
    let response = app
        .get(
            &format!("/webhooks/whatsapp?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={VERIFY_TOKEN}"),
            None,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(response.text().await.unwrap(), "1158201444");
}

#[tokio::test]
async fn a_wrong_token_or_mode_is_403() {
    let app = spawn_app().await;
    for query in [
        "hub.mode=subscribe&hub.challenge=1&hub.verify_token=wrong",
        &format!("hub.mode=unsubscribe&hub.challenge=1&hub.verify_token={VERIFY_TOKEN}"),
        &format!("hub.challenge=1&hub.verify_token={VERIFY_TOKEN}"),
        "hub.mode=subscribe&hub.challenge=1",
    ] {
        let response = app.get(&format!("/webhooks/whatsapp?{query}"), None).await;
        assert_eq!(response.status(), 403, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "forbidden");
    }
}

#[tokio::test]
async fn without_a_configured_token_the_handshake_is_refused() {
    let app = spawn_app_with(|settings| settings.verify_token = None).await;
    let response = app
        .get(
            "/webhooks/whatsapp?hub.mode=subscribe&hub.challenge=1&hub.verify_token=",
            None,
        )
        .await;
    assert_eq!(response.status(), 403);
}
