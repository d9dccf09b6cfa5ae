//! First-touch attribution (SPEC §5.1, §5.2) observed over HTTP: webhooks in, lookups out.

use serde_json::{json, Value};

use crate::helpers::{
    automatic_event_webhook, messages_webhook, metric_value, referral, spawn_app, TestApp,
    ADMIN_TOKEN, SAMPLE_ACCOUNT_ID, SAMPLE_PHONE_NUMBER_ID, SAMPLE_WABA_ID,
};

const DAY: i64 = 86_400;
const WINDOW: i64 = 7 * DAY;
/// 2025-06-15T15:06:40Z.
const T0: i64 = 1_750_000_000;

async fn app_with_account() -> TestApp {
    let app = spawn_app().await;
    app.register_sample_account().await;
    app
}

async fn post(app: &TestApp, body: &Value) {
    let response = app.post_webhook_json(body).await;
    assert_eq!(response.status().as_u16(), 200, "webhook {body}");
}

fn rfc3339(unix_seconds: i64) -> String {
    chrono::DateTime::from_timestamp(unix_seconds, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn metadata_value(phone_number_id: &str) -> Value {
    json!({"display_phone_number": "15550783881", "phone_number_id": phone_number_id})
}

fn text_message(id: &str, from: &str, timestamp: &str) -> Value {
    json!({"from": from, "id": id, "timestamp": timestamp, "type": "text", "text": {"body": "hi"}})
}

fn contact(wa_id: &str, name: &str) -> Value {
    json!({"wa_id": wa_id, "profile": {"name": name}})
}

async fn only_conversation(app: &TestApp, phone: &str) -> Value {
    let conversations = app.sample_conversations(phone).await;
    assert_eq!(
        conversations.len(),
        1,
        "conversations of {phone}: {conversations:#?}"
    );
    conversations.into_iter().next().unwrap()
}

#[tokio::test]
async fn every_entry_change_and_message_of_one_post_is_recorded() {
    let app = app_with_account().await;
    // Two entries; the first has two `messages` changes; messages from four users, one of whom
    // writes in two places.
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": SAMPLE_WABA_ID,
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": metadata_value(SAMPLE_PHONE_NUMBER_ID),
                            "contacts": [contact("15550000001", "Ann"), contact("15550000002", "Bob")],
                            "messages": [
                                {
                                    "from": "15550000001", "id": "wamid.MULTI-A1", "timestamp": T0.to_string(),
                                    "type": "text", "text": {"body": "hi"},
                                    "referral": referral(Some("CLID-ANN"), "ad-ann")
                                },
                                text_message("wamid.MULTI-B1", "15550000002", &(T0 + 1).to_string())
                            ]
                        }
                    },
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": metadata_value(SAMPLE_PHONE_NUMBER_ID),
                            "contacts": [contact("15550000003", "Cat")],
                            "messages": [{
                                "from": "15550000003", "id": "wamid.MULTI-C1", "timestamp": (T0 + 2).to_string(),
                                "type": "text", "text": {"body": "hi"},
                                "referral": referral(Some("CLID-CAT"), "ad-cat")
                            }]
                        }
                    }
                ]
            },
            {
                "id": SAMPLE_WABA_ID,
                "changes": [{
                    "field": "messages",
                    "value": {
                        "messaging_product": "whatsapp",
                        "metadata": metadata_value(SAMPLE_PHONE_NUMBER_ID),
                        "contacts": [contact("15550000004", "Dan"), contact("15550000001", "Ann")],
                        "messages": [
                            text_message("wamid.MULTI-D1", "15550000004", &(T0 + 3).to_string()),
                            text_message("wamid.MULTI-A2", "15550000001", &(T0 + 4).to_string())
                        ]
                    }
                }]
            }
        ]
    });
    post(&app, &body).await;

    let ann = only_conversation(&app, "15550000001").await;
    assert_eq!(ann["messageCount"], 2);
    assert_eq!(ann["metadata"]["ctwa_clid"], "CLID-ANN");
    assert_eq!(ann["user"]["name"], "Ann");
    assert_eq!(ann["startedAt"], rfc3339(T0));
    assert_eq!(ann["lastInboundAt"], rfc3339(T0 + 4));

    let bob = only_conversation(&app, "15550000002").await;
    assert_eq!(bob["messageCount"], 1);
    assert_eq!(bob["metadata"]["ctwa_clid"], Value::Null);
    assert_eq!(bob["user"]["name"], "Bob");

    let cat = only_conversation(&app, "15550000003").await;
    assert_eq!(cat["metadata"]["ctwa_clid"], "CLID-CAT");
    assert_eq!(cat["metadata"]["ctwa_source_id"], "ad-cat");
    assert_eq!(cat["user"]["name"], "Cat");

    let dan = only_conversation(&app, "15550000004").await;
    assert_eq!(dan["messageCount"], 1);
    assert_eq!(dan["user"]["name"], "Dan");

    let metrics = app.metrics().await;
    assert_eq!(metric_value(&metrics, "ctwa_messages_total"), Some(5.0));
    assert_eq!(
        metric_value(&metrics, "ctwa_clicks_total{ctwa_clid=\"present\"}"),
        Some(2.0)
    );
}

#[tokio::test]
async fn the_same_post_delivered_twice_changes_nothing_the_second_time() {
    let app = app_with_account().await;
    let phone = "15550001000";
    let body = messages_webhook(&[
        (
            "wamid.DUP-1",
            phone,
            T0,
            Some(referral(Some("CLID-DUP"), "ad-dup")),
        ),
        ("wamid.DUP-2", phone, T0 + 60, None),
    ]);
    post(&app, &body).await;
    let first = only_conversation(&app, phone).await;
    assert_eq!(first["messageCount"], 2);
    assert_eq!(first["clicks"].as_array().unwrap().len(), 1);

    // Meta redelivers byte for byte.
    post(&app, &body).await;
    let second = only_conversation(&app, phone).await;
    assert_eq!(
        second, first,
        "a redelivery must not change the conversation"
    );

    let metrics = app.metrics().await;
    assert_eq!(metric_value(&metrics, "ctwa_messages_total"), Some(2.0));
    assert_eq!(
        metric_value(&metrics, "ctwa_messages_duplicate_total"),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&metrics, "ctwa_clicks_total{ctwa_clid=\"present\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "ctwa_webhooks_verified_total"),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_redelivered_message_inside_a_new_post_is_still_a_duplicate() {
    let app = app_with_account().await;
    let phone = "15550001001";
    post(
        &app,
        &messages_webhook(&[(
            "wamid.REDUP-1",
            phone,
            T0,
            Some(referral(Some("CLID-1"), "ad-1")),
        )]),
    )
    .await;
    // A different POST that repeats the first message next to a new one.
    post(
        &app,
        &messages_webhook(&[
            (
                "wamid.REDUP-1",
                phone,
                T0,
                Some(referral(Some("CLID-1"), "ad-1")),
            ),
            ("wamid.REDUP-2", phone, T0 + 5, None),
        ]),
    )
    .await;
    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["messageCount"], 2);
    assert_eq!(conversation["clicks"].as_array().unwrap().len(), 1);
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "ctwa_messages_duplicate_total"),
        Some(1.0)
    );
}

#[tokio::test]
async fn an_earlier_click_arriving_after_a_later_message_still_wins() {
    let app = app_with_account().await;
    let phone = "15550002000";
    // The plain message (ts 2000) is delivered first, the click it followed (ts 1000) second.
    post(
        &app,
        &messages_webhook(&[("wamid.LATER", phone, 2000, None)]),
    )
    .await;
    post(
        &app,
        &messages_webhook(&[(
            "wamid.EARLIER",
            phone,
            1000,
            Some(referral(Some("CLID-EARLY"), "ad-early")),
        )]),
    )
    .await;

    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["messageCount"], 2);
    assert_eq!(conversation["startedAt"], rfc3339(1000));
    assert_eq!(conversation["lastInboundAt"], rfc3339(2000));
    let metadata = &conversation["metadata"];
    assert_eq!(metadata["ctwa_clid"], "CLID-EARLY");
    assert_eq!(metadata["ctwa_message_id"], "wamid.EARLIER");
    assert_eq!(metadata["ctwa_clicked_at"], rfc3339(1000));
    assert_eq!(metadata["ctwa_via"], "referral");
}

#[tokio::test]
async fn reordered_clicks_inside_one_conversation_keep_the_earliest() {
    let app = app_with_account().await;
    let phone = "15550002001";
    post(
        &app,
        &messages_webhook(&[(
            "wamid.R-2",
            phone,
            T0 + 100,
            Some(referral(Some("CLID-SECOND"), "ad-2")),
        )]),
    )
    .await;
    post(
        &app,
        &messages_webhook(&[(
            "wamid.R-1",
            phone,
            T0,
            Some(referral(Some("CLID-FIRST"), "ad-1")),
        )]),
    )
    .await;
    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["metadata"]["ctwa_clid"], "CLID-FIRST");
    assert_eq!(conversation["metadata"]["ctwa_source_id"], "ad-1");
    assert_eq!(conversation["clicks"].as_array().unwrap().len(), 2);
    assert_eq!(conversation["startedAt"], rfc3339(T0));
}

#[tokio::test]
async fn a_second_click_inside_the_window_is_recorded_without_changing_the_attribution() {
    let app = app_with_account().await;
    let phone = "15550003000";
    post(
        &app,
        &messages_webhook(&[(
            "wamid.W-1",
            phone,
            T0,
            Some(referral(Some("CLID-A"), "ad-a")),
        )]),
    )
    .await;
    post(
        &app,
        &messages_webhook(&[(
            "wamid.W-2",
            phone,
            T0 + 3 * DAY,
            Some(referral(Some("CLID-B"), "ad-b")),
        )]),
    )
    .await;
    // Exactly at the end of the window is still inside it.
    post(
        &app,
        &messages_webhook(&[(
            "wamid.W-3",
            phone,
            T0 + WINDOW,
            Some(referral(Some("CLID-C"), "ad-c")),
        )]),
    )
    .await;

    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["messageCount"], 3);
    assert_eq!(conversation["metadata"]["ctwa_clid"], "CLID-A");
    assert_eq!(conversation["metadata"]["ctwa_source_id"], "ad-a");
    assert_eq!(conversation["metadata"]["ctwa_clicked_at"], rfc3339(T0));
    let clicks: Vec<&Value> = conversation["clicks"].as_array().unwrap().iter().collect();
    assert_eq!(clicks.len(), 3);
    let clids: Vec<&str> = clicks
        .iter()
        .map(|click| click["ctwaClid"].as_str().unwrap())
        .collect();
    assert!(clids.contains(&"CLID-A") && clids.contains(&"CLID-B") && clids.contains(&"CLID-C"));
}

#[tokio::test]
async fn a_click_after_the_window_opens_a_new_conversation_listed_first() {
    let app = app_with_account().await;
    let phone = "15550003001";
    post(
        &app,
        &messages_webhook(&[(
            "wamid.NW-1",
            phone,
            T0,
            Some(referral(Some("CLID-OLD"), "ad-old")),
        )]),
    )
    .await;
    post(
        &app,
        &messages_webhook(&[(
            "wamid.NW-2",
            phone,
            T0 + 2 * DAY,
            Some(referral(Some("CLID-INSIDE"), "ad-inside")),
        )]),
    )
    .await;
    let late = T0 + WINDOW + 1;
    post(
        &app,
        &messages_webhook(&[(
            "wamid.NW-3",
            phone,
            late,
            Some(referral(Some("CLID-NEW"), "ad-new")),
        )]),
    )
    .await;
    // A plain message after that belongs to the new conversation.
    post(
        &app,
        &messages_webhook(&[("wamid.NW-4", phone, late + 60, None)]),
    )
    .await;

    let conversations = app.sample_conversations(phone).await;
    assert_eq!(conversations.len(), 2, "{conversations:#?}");
    let (newest, oldest) = (&conversations[0], &conversations[1]);
    assert_ne!(newest["id"], oldest["id"]);

    assert_eq!(newest["metadata"]["ctwa_clid"], "CLID-NEW");
    assert_eq!(newest["metadata"]["ctwa_source_id"], "ad-new");
    assert_eq!(newest["metadata"]["ctwa_clicked_at"], rfc3339(late));
    assert_eq!(newest["startedAt"], rfc3339(late));
    assert_eq!(newest["messageCount"], 2);
    assert_eq!(newest["clicks"].as_array().unwrap().len(), 1);

    assert_eq!(oldest["metadata"]["ctwa_clid"], "CLID-OLD");
    assert_eq!(oldest["startedAt"], rfc3339(T0));
    assert_eq!(oldest["messageCount"], 2);
    assert_eq!(oldest["clicks"].as_array().unwrap().len(), 2);

    // The same shape through the raw attribution endpoint.
    let body = app.attribution(phone).await;
    assert_eq!(body["phone"], phone);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["accountId"], SAMPLE_ACCOUNT_ID);
    assert_eq!(results[0]["user"]["waId"], phone);
    let listed: Vec<&Value> = results[0]["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|conversation| &conversation["id"])
        .collect();
    assert_eq!(listed, vec![&newest["id"], &oldest["id"]]);
}

#[tokio::test]
async fn an_automatic_event_fills_the_click_id_of_a_status_ad_conversation() {
    let app = app_with_account().await;
    let phone = "15550004000";
    post(
        &app,
        &messages_webhook(&[(
            "wamid.STATUS-1",
            phone,
            T0,
            Some(referral(None, "ad-status")),
        )]),
    )
    .await;
    let before = only_conversation(&app, phone).await;
    assert_eq!(before["metadata"]["ctwa_clid"], Value::Null);
    assert_eq!(before["metadata"]["ctwa_source_id"], "ad-status");

    post(
        &app,
        &automatic_event_webhook(
            "wamid.STATUS-1",
            "LeadSubmitted",
            Some("CLID-FROM-EVENT"),
            None,
        ),
    )
    .await;
    let after = only_conversation(&app, phone).await;
    assert_eq!(after["id"], before["id"]);
    let metadata = &after["metadata"];
    assert_eq!(metadata["ctwa_clid"], "CLID-FROM-EVENT");
    assert_eq!(metadata["ctwa_via"], "automatic_event");
    assert_eq!(metadata["ctwa_source_id"], "ad-status");
    assert_eq!(metadata["ctwa_headline"], "Chat with us");
    assert_eq!(metadata["ctwa_message_id"], "wamid.STATUS-1");
    let events = after["automaticEvents"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["eventName"], "LeadSubmitted");
    assert_eq!(events[0]["messageId"], "wamid.STATUS-1");
    assert_eq!(events[0]["ctwaClid"], "CLID-FROM-EVENT");

    // The same event again changes nothing.
    post(
        &app,
        &automatic_event_webhook(
            "wamid.STATUS-1",
            "LeadSubmitted",
            Some("CLID-FROM-EVENT"),
            None,
        ),
    )
    .await;
    assert_eq!(only_conversation(&app, phone).await, after);
}

#[tokio::test]
async fn an_automatic_event_never_replaces_a_referral_click_id() {
    let app = app_with_account().await;
    let phone = "15550004001";
    post(
        &app,
        &messages_webhook(&[(
            "wamid.REF-1",
            phone,
            T0,
            Some(referral(Some("CLID-REFERRAL"), "ad-1")),
        )]),
    )
    .await;
    post(
        &app,
        &automatic_event_webhook("wamid.REF-1", "LeadSubmitted", Some("CLID-OTHER"), None),
    )
    .await;
    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["metadata"]["ctwa_clid"], "CLID-REFERRAL");
    assert_eq!(conversation["metadata"]["ctwa_via"], "referral");
    assert_eq!(conversation["automaticEvents"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_automatic_event_that_arrives_before_its_message_is_matched_later() {
    let app = app_with_account().await;
    let phone = "15550005000";
    post(
        &app,
        &automatic_event_webhook(
            "wamid.EARLY-EVENT",
            "LeadSubmitted",
            Some("CLID-EARLY-EVENT"),
            None,
        ),
    )
    .await;
    assert!(app.sample_conversations(phone).await.is_empty());

    // The message itself carries no referral: the event's click id becomes the attribution.
    post(
        &app,
        &messages_webhook(&[("wamid.EARLY-EVENT", phone, T0, None)]),
    )
    .await;
    let conversation = only_conversation(&app, phone).await;
    let events = conversation["automaticEvents"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["eventName"], "LeadSubmitted");
    assert_eq!(events[0]["messageId"], "wamid.EARLY-EVENT");
    let metadata = &conversation["metadata"];
    assert_eq!(metadata["ctwa_clid"], "CLID-EARLY-EVENT");
    assert_eq!(metadata["ctwa_via"], "automatic_event");
    assert_eq!(metadata["ctwa_message_id"], "wamid.EARLY-EVENT");
    assert_eq!(metadata["ctwa_clicked_at"], rfc3339(T0));
}

#[tokio::test]
async fn an_early_automatic_event_does_not_replace_the_click_id_of_its_message() {
    let app = app_with_account().await;
    let phone = "15550005001";
    post(
        &app,
        &automatic_event_webhook("wamid.EARLY-2", "LeadSubmitted", Some("CLID-EVENT"), None),
    )
    .await;
    post(
        &app,
        &messages_webhook(&[(
            "wamid.EARLY-2",
            phone,
            T0,
            Some(referral(Some("CLID-MESSAGE"), "ad-m")),
        )]),
    )
    .await;
    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["metadata"]["ctwa_clid"], "CLID-MESSAGE");
    assert_eq!(conversation["metadata"]["ctwa_via"], "referral");
    assert_eq!(conversation["automaticEvents"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_purchase_value_is_stored_divided_by_1000() {
    let app = app_with_account().await;
    let phone = "15550006000";
    post(
        &app,
        &messages_webhook(&[(
            "wamid.BUY-1",
            phone,
            T0,
            Some(referral(Some("CLID-BUY"), "ad-buy")),
        )]),
    )
    .await;
    post(
        &app,
        &automatic_event_webhook("wamid.BUY-1", "Purchase", Some("CLID-BUY"), Some(25000)),
    )
    .await;
    let conversation = only_conversation(&app, phone).await;
    let events = conversation["automaticEvents"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["eventName"], "Purchase");
    assert_eq!(events[0]["value"].as_f64(), Some(25.0));
    assert_eq!(events[0]["currency"], "USD");
    assert_eq!(events[0]["timestamp"], rfc3339(1749069089));
}

#[tokio::test]
async fn a_user_known_only_by_bsuid_is_found_by_bsuid() {
    let app = app_with_account().await;
    let bsuid = "US.13491208655302741918";
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": SAMPLE_WABA_ID, "changes": [{
            "field": "messages",
            "value": {
                "messaging_product": "whatsapp",
                "metadata": metadata_value(SAMPLE_PHONE_NUMBER_ID),
                "contacts": [{"user_id": bsuid, "profile": {"name": "Hidden Number", "username": "hidden.user"}}],
                "messages": [{
                    "from_user_id": bsuid,
                    "id": "wamid.BSUID-1",
                    "timestamp": T0.to_string(),
                    "type": "text",
                    "text": {"body": "hi"},
                    "referral": referral(Some("CLID-BSUID"), "ad-bsuid")
                }]
            }
        }]}]
    });
    post(&app, &body).await;

    let response = app
        .get(
            &format!("/v1/whatsapp/attribution?bsuid={bsuid}"),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(response.status(), 200);
    let found: Value = response.json().await.unwrap();
    let results = found["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{found:#}");
    let result = &results[0];
    assert_eq!(result["accountId"], SAMPLE_ACCOUNT_ID);
    assert_eq!(result["user"]["waId"], Value::Null);
    assert_eq!(result["user"]["bsuid"], bsuid);
    assert_eq!(result["user"]["name"], "Hidden Number");
    let conversations = result["conversations"].as_array().unwrap();
    assert_eq!(conversations.len(), 1);
    assert_eq!(conversations[0]["metadata"]["ctwa_clid"], "CLID-BSUID");
    assert_eq!(conversations[0]["user"]["waId"], Value::Null);

    // A second message from the same BSUID continues the same conversation.
    let mut again = body.clone();
    again["entry"][0]["changes"][0]["value"]["messages"][0] = json!({
        "from_user_id": bsuid, "id": "wamid.BSUID-2", "timestamp": (T0 + 30).to_string(),
        "type": "text", "text": {"body": "still me"}
    });
    post(&app, &again).await;
    let conversation = app
        .conversation(conversations[0]["id"].as_str().unwrap())
        .await;
    assert_eq!(conversation["messageCount"], 2);
    assert_eq!(conversation["user"]["bsuid"], bsuid);
}

#[tokio::test]
async fn echoes_history_and_statuses_never_open_conversations() {
    let app = app_with_account().await;
    let phone = "15550007000";
    let message = json!({
        "from": phone, "id": "wamid.NOT-INBOUND", "timestamp": T0.to_string(), "type": "text",
        "text": {"body": "hello"}, "referral": referral(Some("CLID-NOT-INBOUND"), "ad-x")
    });
    let echoes = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": SAMPLE_WABA_ID, "changes": [{
            "field": "smb_message_echoes",
            "value": {
                "messaging_product": "whatsapp",
                "metadata": metadata_value(SAMPLE_PHONE_NUMBER_ID),
                "contacts": [contact(phone, "Echo")],
                "message_echoes": [{
                    "from": "15550783881", "to": phone, "id": "wamid.ECHO-1",
                    "timestamp": T0.to_string(), "type": "text", "text": {"body": "from the app"}
                }],
                "messages": [message.clone()]
            }
        }]}]
    });
    let history = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": SAMPLE_WABA_ID, "changes": [{
            "field": "history",
            "value": {
                "messaging_product": "whatsapp",
                "metadata": metadata_value(SAMPLE_PHONE_NUMBER_ID),
                "history": [{
                    "metadata": {"phase": 0, "chunk_order": 1, "progress": 100},
                    "threads": [{"id": phone, "messages": [message.clone()]}]
                }],
                "messages": [message.clone()]
            }
        }]}]
    });
    let statuses = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": SAMPLE_WABA_ID, "changes": [{
            "field": "messages",
            "value": {
                "messaging_product": "whatsapp",
                "metadata": metadata_value(SAMPLE_PHONE_NUMBER_ID),
                "statuses": [
                    {"id": "wamid.OUT-1", "status": "sent", "timestamp": T0.to_string(), "recipient_id": phone},
                    {"id": "wamid.OUT-1", "status": "read", "timestamp": (T0 + 9).to_string(), "recipient_id": phone}
                ]
            }
        }]}]
    });
    for body in [&echoes, &history, &statuses] {
        post(&app, body).await;
    }
    assert!(app.sample_conversations(phone).await.is_empty());
    let metrics = app.metrics().await;
    assert_eq!(metric_value(&metrics, "ctwa_messages_total"), Some(0.0));
    assert_eq!(
        metric_value(&metrics, "ctwa_webhooks_verified_total"),
        Some(3.0)
    );

    // The message id was not consumed either: the real inbound message is still recorded.
    post(
        &app,
        &messages_webhook(&[(
            "wamid.NOT-INBOUND",
            phone,
            T0,
            Some(referral(Some("CLID-REAL"), "ad-x")),
        )]),
    )
    .await;
    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["metadata"]["ctwa_clid"], "CLID-REAL");
}

#[tokio::test]
async fn a_webhook_for_an_unknown_number_is_replayed_when_the_account_is_registered() {
    let app = spawn_app().await;
    let phone = "15550008000";
    post(
        &app,
        &messages_webhook(&[(
            "wamid.UNROUTED-1",
            phone,
            T0,
            Some(referral(Some("CLID-HELD"), "ad-held")),
        )]),
    )
    .await;
    post(
        &app,
        &automatic_event_webhook("wamid.UNROUTED-1", "LeadSubmitted", Some("CLID-HELD"), None),
    )
    .await;
    let before = app.attribution(phone).await;
    assert!(
        before["results"].as_array().unwrap().is_empty(),
        "{before:#}"
    );
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "ctwa_webhook_changes_unrouted_total"),
        Some(2.0)
    );

    app.register_sample_account().await;
    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["metadata"]["ctwa_clid"], "CLID-HELD");
    assert_eq!(conversation["metadata"]["ctwa_source_id"], "ad-held");
    assert_eq!(conversation["metadata"]["ctwa_clicked_at"], rfc3339(T0));
    assert_eq!(conversation["automaticEvents"].as_array().unwrap().len(), 1);

    // Held changes are replayed once: a later change of the account does not add them again.
    let response = app
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
            Some(ADMIN_TOKEN),
            &json!({"name": "Renamed"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(only_conversation(&app, phone).await, conversation);
}

#[tokio::test]
async fn numeric_timestamps_work_like_string_ones() {
    let app = app_with_account().await;
    let phone = "15550009000";
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": SAMPLE_WABA_ID, "changes": [{
            "field": "messages",
            "value": {
                "messaging_product": "whatsapp",
                "metadata": metadata_value(SAMPLE_PHONE_NUMBER_ID),
                "contacts": [contact(phone, "Numeric")],
                "messages": [
                    {
                        "from": phone, "id": "wamid.NUM-2", "timestamp": 1750276992,
                        "type": "text", "text": {"body": "later"}
                    },
                    {
                        "from": phone, "id": "wamid.NUM-1", "timestamp": 1750275992,
                        "type": "text", "text": {"body": "hi"},
                        "referral": referral(Some("CLID-NUMERIC"), "ad-num")
                    }
                ]
            }
        }]}]
    });
    post(&app, &body).await;
    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["startedAt"], "2025-06-18T19:46:32Z");
    assert_eq!(conversation["lastInboundAt"], rfc3339(1750276992));
    assert_eq!(conversation["metadata"]["ctwa_clid"], "CLID-NUMERIC");
    assert_eq!(
        conversation["metadata"]["ctwa_clicked_at"],
        "2025-06-18T19:46:32Z"
    );

    // An automatic event with its timestamp as a string.
    let mut event =
        automatic_event_webhook("wamid.NUM-1", "LeadSubmitted", Some("CLID-NUMERIC"), None);
    event["entry"][0]["changes"][0]["value"]["automatic_events"][0]["timestamp"] =
        json!("1750276000");
    post(&app, &event).await;
    let conversation = only_conversation(&app, phone).await;
    assert_eq!(
        conversation["automaticEvents"][0]["timestamp"],
        rfc3339(1750276000)
    );
}

/// The clids of a phone's conversations on the sample account, newest first, with their
/// message counts.
async fn conversation_summary(app: &TestApp, phone: &str) -> Vec<(Value, Value, Value)> {
    app.sample_conversations(phone)
        .await
        .iter()
        .map(|conversation| {
            (
                conversation["metadata"]["ctwa_clid"].clone(),
                conversation["startedAt"].clone(),
                conversation["messageCount"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn clicks_more_than_a_window_apart_split_whatever_the_arrival_order() {
    let app = app_with_account().await;
    let late = T0 + 8 * DAY;
    let in_order = "15550010000";
    let reversed = "15550010001";
    let webhook = |phone: &str, wamid: &str, timestamp: i64, clid: &str| {
        messages_webhook(&[(
            &format!("{wamid}-{phone}"),
            phone,
            timestamp,
            Some(referral(Some(clid), "ad")),
        )])
    };
    post(&app, &webhook(in_order, "wamid.ORDER-A", T0, "CLID-A")).await;
    post(&app, &webhook(in_order, "wamid.ORDER-C", late, "CLID-C")).await;
    post(&app, &webhook(reversed, "wamid.ORDER-C", late, "CLID-C")).await;
    post(&app, &webhook(reversed, "wamid.ORDER-A", T0, "CLID-A")).await;

    let expected = vec![
        (json!("CLID-C"), json!(rfc3339(late)), json!(1)),
        (json!("CLID-A"), json!(rfc3339(T0)), json!(1)),
    ];
    assert_eq!(conversation_summary(&app, in_order).await, expected);
    assert_eq!(
        conversation_summary(&app, reversed).await,
        expected,
        "the arrival order changed the conversations"
    );
}

/// FIXME (known limitation, see ARCHITECTURE.md): a late click that opens a conversation does
/// not move messages already stored with later timestamps out of the previous one. Attribution
/// is the same either way; the message count and last inbound time depend on arrival order.
/// This pins today's outcome of the reordered case; when it is fixed, it equals `expected`.
#[tokio::test]
async fn a_plain_message_lands_in_the_conversation_current_at_its_timestamp_whatever_the_order() {
    let app = app_with_account().await;
    let in_order = "15550010002";
    let reordered = "15550010003";
    let click_a = |phone: &str| {
        messages_webhook(&[(
            &format!("wamid.P-A-{phone}"),
            phone,
            T0,
            Some(referral(Some("CLID-A"), "ad")),
        )])
    };
    let click_c = |phone: &str| {
        messages_webhook(&[(
            &format!("wamid.P-C-{phone}"),
            phone,
            T0 + 8 * DAY,
            Some(referral(Some("CLID-C"), "ad")),
        )])
    };
    let plain = |phone: &str| {
        messages_webhook(&[(&format!("wamid.P-X-{phone}"), phone, T0 + 10 * DAY, None)])
    };

    post(&app, &click_a(in_order)).await;
    post(&app, &click_c(in_order)).await;
    post(&app, &plain(in_order)).await;
    // The plain message overtakes the second click.
    post(&app, &click_a(reordered)).await;
    post(&app, &plain(reordered)).await;
    post(&app, &click_c(reordered)).await;

    let expected = vec![
        (json!("CLID-C"), json!(rfc3339(T0 + 8 * DAY)), json!(2)),
        (json!("CLID-A"), json!(rfc3339(T0)), json!(1)),
    ];
    assert_eq!(conversation_summary(&app, in_order).await, expected);
    assert_eq!(
        conversation_summary(&app, reordered).await,
        vec![
            (json!("CLID-C"), json!(rfc3339(T0 + 8 * DAY)), json!(1)),
            (json!("CLID-A"), json!(rfc3339(T0)), json!(2)),
        ],
        "FIXME: the plain message stayed in CLID-A's conversation; it belongs to CLID-C's"
    );
}

#[tokio::test]
async fn a_post_mixing_a_known_and_an_unknown_number_is_processed_once_for_each() {
    let app = spawn_app().await;
    let other_number = "209876543210987";
    app.register_account("acc_known", other_number).await;
    let phone = "15550011000";
    let known = crate::helpers::for_phone_number_id(
        messages_webhook(&[(
            "wamid.MIX-KNOWN",
            phone,
            T0,
            Some(referral(Some("CLID-KNOWN"), "ad-k")),
        )]),
        other_number,
    );
    let unknown = messages_webhook(&[(
        "wamid.MIX-UNKNOWN",
        phone,
        T0 + 1,
        Some(referral(Some("CLID-UNKNOWN"), "ad-u")),
    )]);
    let mut body = known.clone();
    body["entry"]
        .as_array_mut()
        .unwrap()
        .push(unknown["entry"][0].clone());
    post(&app, &body).await;

    let result_of = |body: &Value, account_id: &str| -> Option<Value> {
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|result| result["accountId"] == account_id)
            .cloned()
    };
    let before = app.attribution(phone).await;
    let known_result = result_of(&before, "acc_known").expect("the known number is processed now");
    assert_eq!(
        known_result["conversations"][0]["metadata"]["ctwa_clid"],
        "CLID-KNOWN"
    );
    assert!(result_of(&before, SAMPLE_ACCOUNT_ID).is_none());

    app.register_sample_account().await;
    let after = app.attribution(phone).await;
    let sample_result = result_of(&after, SAMPLE_ACCOUNT_ID).expect("the held change is replayed");
    assert_eq!(
        sample_result["conversations"][0]["metadata"]["ctwa_clid"],
        "CLID-UNKNOWN"
    );
    // The replay did not process the known number's change a second time.
    let known_after = result_of(&after, "acc_known").unwrap();
    assert_eq!(known_after["conversations"].as_array().unwrap().len(), 1);
    assert_eq!(known_after["conversations"][0]["messageCount"], 1);
}

#[tokio::test]
async fn changes_held_for_a_number_are_replayed_when_an_account_moves_to_it() {
    let app = spawn_app().await;
    app.register_account(SAMPLE_ACCOUNT_ID, "209876543210987")
        .await;
    let phone = "15550012000";
    post(
        &app,
        &messages_webhook(&[(
            "wamid.MOVE-1",
            phone,
            T0,
            Some(referral(Some("CLID-MOVED"), "ad-m")),
        )]),
    )
    .await;
    assert!(app.sample_conversations(phone).await.is_empty());

    let response = app
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
            Some(ADMIN_TOKEN),
            &json!({"phoneNumberId": SAMPLE_PHONE_NUMBER_ID}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let conversation = only_conversation(&app, phone).await;
    assert_eq!(conversation["metadata"]["ctwa_clid"], "CLID-MOVED");
}
