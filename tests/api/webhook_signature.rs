use serde_json::{json, Value};

use crate::helpers::{
    messages_webhook, metric_value, referral, sign, sign_with, spawn_app, spawn_app_with,
    ROTATED_APP_SECRET, SAMPLE_PHONE,
};

#[tokio::test]
async fn a_valid_signature_is_accepted_with_exactly_200() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&messages_webhook(&[(
        "wamid.S1",
        SAMPLE_PHONE,
        1750275992,
        None,
    )]))
    .unwrap();
    let response = app.post_webhook(&body).await;
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn missing_or_wrong_signatures_are_401_and_store_nothing() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let body = serde_json::to_vec(&messages_webhook(&[(
        "wamid.S2",
        SAMPLE_PHONE,
        1750275992,
        Some(referral(Some("CLID-REJECTED"), "ad-1")),
    )]))
    .unwrap();

    let missing = app.post_webhook_signed(&body, None).await;
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["code"],
        "missing_signature"
    );

    let wrong = app
        .post_webhook_signed(&body, Some(&sign_with("not-our-secret", &body)))
        .await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        wrong.json::<Value>().await.unwrap()["code"],
        "invalid_signature"
    );

    let garbage = app.post_webhook_signed(&body, Some("sha256=nothex")).await;
    assert_eq!(garbage.status(), 401);

    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let tampered_response = app.post_webhook_signed(&tampered, Some(&sign(&body))).await;
    assert_eq!(tampered_response.status(), 401);

    assert!(app.sample_conversations(SAMPLE_PHONE).await.is_empty());
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "ctwa_webhooks_verified_total"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "ctwa_webhooks_rejected_total{reason=\"invalid_signature\"}"
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn a_rotated_secret_still_verifies() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let body = serde_json::to_vec(&messages_webhook(&[(
        "wamid.S3",
        SAMPLE_PHONE,
        1750275992,
        Some(referral(Some("CLID-ROTATED"), "ad-1")),
    )]))
    .unwrap();
    let response = app
        .post_webhook_signed(&body, Some(&sign_with(ROTATED_APP_SECRET, &body)))
        .await;
    assert_eq!(response.status(), 200);
    let conversations = app.sample_conversations(SAMPLE_PHONE).await;
    assert_eq!(conversations[0]["metadata"]["ctwa_clid"], "CLID-ROTATED");
}

#[tokio::test]
async fn escaped_non_ascii_is_verified_on_the_raw_bytes() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    // As Meta sends it: non-ASCII escaped, `/` escaped too.
    let raw = br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"contacts":[{"profile":{"name":"J\u00fcrgen M\u00fcller \ud83d\ude00"},"wa_id":"4915112345678"}],"messages":[{"from":"4915112345678","id":"wamid.UNICODE","timestamp":"1750275992","type":"text","text":{"body":"Gr\u00fc\u00dfe"},"referral":{"source_url":"https:\/\/fb.me\/x","source_id":"1","source_type":"ad","ctwa_clid":"CLID\/UNICODE"}}]},"field":"messages"}]}]}"#;
    // Re-serialising the parsed body changes its bytes, so a signature over it would not match.
    let reserialised = serde_json::to_vec(&serde_json::from_slice::<Value>(raw).unwrap()).unwrap();
    assert_ne!(sign(raw), sign(&reserialised));

    let response = app.post_webhook(raw).await;
    assert_eq!(response.status(), 200);
    let conversations = app.sample_conversations("4915112345678").await;
    assert_eq!(conversations.len(), 1);
    assert_eq!(conversations[0]["user"]["name"], "Jürgen Müller 😀");
    assert_eq!(conversations[0]["metadata"]["ctwa_clid"], "CLID/UNICODE");
    assert_eq!(
        conversations[0]["metadata"]["ctwa_source_url"],
        "https://fb.me/x"
    );
}

#[tokio::test]
async fn a_valid_signature_over_invalid_json_is_journaled_and_acknowledged() {
    let app = spawn_app().await;
    for body in [
        &b"{this is not json"[..],
        br#"{"object":"page","entries":[]}"#,
    ] {
        let response = app.post_webhook(body).await;
        assert_eq!(response.status(), 200);
    }
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "ctwa_webhooks_unparseable_total"),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&metrics, "ctwa_webhooks_verified_total"),
        Some(2.0)
    );
}

#[tokio::test]
async fn bodies_over_4_mib_are_413() {
    let app = spawn_app().await;
    let padding = "x".repeat(4 * 1024 * 1024);
    let body = serde_json::to_vec(
        &json!({"object": "whatsapp_business_account", "entry": [], "pad": padding}),
    )
    .unwrap();
    let response = app.post_webhook(&body).await;
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "payload_too_large"
    );

    // A large body under the limit is fine.
    let padding = "x".repeat(3 * 1024 * 1024);
    let body = serde_json::to_vec(
        &json!({"object": "whatsapp_business_account", "entry": [], "pad": padding}),
    )
    .unwrap();
    assert_eq!(app.post_webhook(&body).await.status(), 200);
}

#[tokio::test]
async fn without_an_app_secret_webhooks_are_503() {
    let app = spawn_app_with(|settings| settings.app_secrets.clear()).await;
    let body = b"{}";
    let response = app.post_webhook(body).await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "webhook_not_configured"
    );
}
