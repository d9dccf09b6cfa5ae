//! Every sample in `fixtures/meta/` through the real endpoint, with its expected effect.

use serde_json::Value;

use crate::helpers::{fixture, spawn_app, TestApp, SAMPLE_ACCOUNT_ID, SAMPLE_PHONE};

async fn app_with_account() -> TestApp {
    let app = spawn_app().await;
    app.register_sample_account().await;
    app
}

async fn post_fixture(app: &TestApp, name: &str) {
    let response = app.post_webhook(&fixture(name)).await;
    assert_eq!(response.status(), 200, "{name}");
}

#[tokio::test]
async fn a_plain_inbound_text_opens_an_unattributed_conversation() {
    let app = app_with_account().await;
    post_fixture(&app, "meta/wa_01_text_inbound.json").await;
    let conversations = app.sample_conversations(SAMPLE_PHONE).await;
    assert_eq!(conversations.len(), 1);
    let conversation = &conversations[0];
    assert_eq!(conversation["accountId"], SAMPLE_ACCOUNT_ID);
    assert_eq!(conversation["user"]["name"], "Sheena Nelson");
    assert_eq!(conversation["user"]["waId"], SAMPLE_PHONE);
    assert_eq!(conversation["metadata"]["ctwa_clid"], Value::Null);
    assert_eq!(conversation["metadata"]["ctwa_source_id"], Value::Null);
    assert_eq!(conversation["startedAt"], "2025-06-08T20:59:43Z");
    assert!(conversation["clicks"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_ctwa_referral_is_captured_verbatim_with_every_field() {
    let app = app_with_account().await;
    post_fixture(&app, "meta/wa_02_text_ctwa_referral.json").await;
    let conversations = app.sample_conversations(SAMPLE_PHONE).await;
    assert_eq!(conversations.len(), 1);
    let metadata = &conversations[0]["metadata"];
    assert_eq!(
        metadata["ctwa_clid"],
        "Aff-n8ZTODiE79d22KtAwQKj9e_mIEOOj27vDVwFjN80dp4_0NiNhEgpGo0AHemvuSoifXaytfTzcchptiErTKCqTrJ5nW1h7IHYeYymGb5K5J5iTROpBhWAGaIAeUzHL50"
    );
    assert_eq!(metadata["ctwa_source_id"], "120226305854810726");
    assert_eq!(metadata["ctwa_source_type"], "ad");
    assert_eq!(metadata["ctwa_source_url"], "https://fb.me/3cr4Wqqkv");
    assert_eq!(metadata["ctwa_headline"], "Chat with us");
    assert_eq!(metadata["ctwa_body"], "Summer Succulents are here!");
    assert_eq!(metadata["ctwa_media_type"], "image");
    assert_eq!(
        metadata["ctwa_image_url"],
        "https://scontent.xx.fbcdn.net/v/t45.1..."
    );
    assert_eq!(metadata["ctwa_video_url"], Value::Null);
    assert_eq!(
        metadata["ctwa_welcome_message"],
        "Hi there! Let us know how we can help!"
    );
    assert_eq!(metadata["ctwa_clicked_at"], "2025-06-18T19:46:32Z");
    assert_eq!(
        metadata["ctwa_message_id"],
        "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUQ0N0VFMDA2MTQ0RkJFNkNDNAA="
    );
    assert_eq!(metadata["ctwa_via"], "referral");
    assert!(metadata["ctwa_captured_at"].is_string());
    assert_eq!(conversations[0]["clicks"].as_array().unwrap().len(), 1);

    // The same conversation by id.
    let id = conversations[0]["id"].as_str().unwrap();
    let response = app
        .get(
            &format!("/v1/whatsapp/conversations/{id}"),
            Some(crate::helpers::ADMIN_TOKEN),
        )
        .await;
    assert_eq!(response.status(), 200);
    let by_id: Value = response.json().await.unwrap();
    assert_eq!(by_id["metadata"], *metadata);
}

#[tokio::test]
async fn a_status_ad_referral_keeps_the_ad_without_a_click_id() {
    let app = app_with_account().await;
    post_fixture(
        &app,
        "meta/wa_04_text_ctwa_status_ad_no_ctwa_clid_DERIVED.json",
    )
    .await;
    let conversations = app.sample_conversations(SAMPLE_PHONE).await;
    assert_eq!(conversations.len(), 1);
    let metadata = &conversations[0]["metadata"];
    assert_eq!(metadata["ctwa_clid"], Value::Null);
    assert_eq!(metadata["ctwa_source_id"], "120226305854810726");
    assert_eq!(metadata["ctwa_headline"], "Chat with us");
    let metrics = app.metrics().await;
    assert_eq!(
        crate::helpers::metric_value(&metrics, "ctwa_clicks_total{ctwa_clid=\"absent\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn statuses_are_acknowledged_and_open_nothing() {
    let app = app_with_account().await;
    post_fixture(&app, "meta/wa_05_status_sent.json").await;
    post_fixture(&app, "meta/wa_06_status_failed.json").await;
    assert!(app.sample_conversations(SAMPLE_PHONE).await.is_empty());
    let metrics = app.metrics().await;
    assert_eq!(
        crate::helpers::metric_value(&metrics, "ctwa_messages_total"),
        Some(0.0)
    );
    assert_eq!(
        crate::helpers::metric_value(&metrics, "ctwa_webhooks_verified_total"),
        Some(2.0)
    );
}

#[tokio::test]
async fn an_automatic_event_for_an_unseen_message_opens_nothing_yet() {
    let app = app_with_account().await;
    post_fixture(&app, "meta/wa_08_automatic_events_lead.json").await;
    assert!(app.sample_conversations(SAMPLE_PHONE).await.is_empty());
}

#[tokio::test]
async fn an_interactive_button_reply_is_an_inbound_message() {
    let app = app_with_account().await;
    post_fixture(&app, "meta/wa_10_interactive_button_reply.json").await;
    let conversations = app.sample_conversations(SAMPLE_PHONE).await;
    assert_eq!(conversations.len(), 1);
    assert_eq!(conversations[0]["messageCount"], 1);
}
