//! `POST /v1/whatsapp/conversions`: the Meta request, validation, lookup, dedup, dry runs.

use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{
    fixture, fixture_json, messages_webhook, referral, spawn_app, TestApp, ACCESS_TOKEN,
    ADMIN_TOKEN, SAMPLE_ACCOUNT_ID, SAMPLE_DATASET_ID, SAMPLE_PHONE,
};

pub const SAMPLE_CLID: &str = "Aff-n8ZTODiE79d22KtAwQKj9e_mIEOOj27vDVwFjN80dp4_0NiNhEgpGo0AHemvuSoifXaytfTzcchptiErTKCqTrJ5nW1h7IHYeYymGb5K5J5iTROpBhWAGaIAeUzHL50";

pub fn events_path() -> String {
    format!("/v25.0/{SAMPLE_DATASET_ID}/events")
}

pub fn meta_success(trace: &str) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_json(json!({"events_received": 1, "messages": [], "fbtrace_id": trace}))
}

/// The sample account, and a conversation of `SAMPLE_PHONE` that started from an ad click one
/// hour ago (the sample referral, re-timed so conversions are inside Meta's limits).
pub async fn app_with_click() -> (TestApp, String) {
    app_with_click_using(|_| {}).await
}

/// [`app_with_click`] with settings changed by `configure`.
pub async fn app_with_click_using(
    configure: impl FnOnce(&mut ctwa_relay::settings::Settings),
) -> (TestApp, String) {
    let app = crate::helpers::spawn_app_with(configure).await;
    app.register_sample_account().await;
    let conversation_id = click(
        &app,
        "wamid.CLICK",
        SAMPLE_PHONE,
        now() - 3600,
        Some(SAMPLE_CLID),
    )
    .await;
    (app, conversation_id)
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Sends one message with a referral (or none) and returns the id of its conversation.
pub async fn click(
    app: &TestApp,
    wamid: &str,
    phone: &str,
    timestamp: i64,
    ctwa_clid: Option<&str>,
) -> String {
    let webhook = messages_webhook(&[(
        wamid,
        phone,
        timestamp,
        Some(referral(ctwa_clid, "120226305854810726")),
    )]);
    assert_eq!(app.post_webhook_json(&webhook).await.status(), 200);
    latest_conversation(app, phone).await
}

pub async fn latest_conversation(app: &TestApp, phone: &str) -> String {
    app.sample_conversations(phone).await[0]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

pub async fn convert(app: &TestApp, token: &str, body: &Value) -> reqwest::Response {
    app.send_json(
        reqwest::Method::POST,
        "/v1/whatsapp/conversions",
        Some(token),
        body,
    )
    .await
}

pub fn lead(conversation_id: &str, event_id: &str) -> Value {
    json!({
        "accountId": SAMPLE_ACCOUNT_ID,
        "eventName": "LeadSubmitted",
        "eventId": event_id,
        "conversationId": conversation_id
    })
}

#[tokio::test]
async fn meta_receives_exactly_the_expected_body_with_the_token_only_in_the_header() {
    let (app, conversation_id) = app_with_click().await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .and(header(
            "authorization",
            format!("Bearer {ACCESS_TOKEN}").as_str(),
        ))
        .respond_with(meta_success("TRACE-FULL"))
        .expect(1)
        .mount(&app.graph)
        .await;
    let event_time = now() - 60;
    let mut request = fixture_json("conversions/purchase_request.json");
    request["conversationId"] = json!(conversation_id);
    request["eventTime"] = json!(event_time);

    // Zernio's client: camelCase body, Bearer API key, the same path.
    let key = app.create_key(&[SAMPLE_ACCOUNT_ID]).await;
    let response = convert(&app, &key, &request).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["platform"], "metaads");
    assert_eq!(body["eventsReceived"], 1);
    assert_eq!(body["eventsFailed"], 0);
    assert_eq!(body["failures"], json!([]));
    assert_eq!(body["traceId"], "TRACE-FULL");
    assert_eq!(body["status"], "sent");

    let received = &app.graph.received_requests().await.unwrap()[0];
    let sent: Value = serde_json::from_slice(&received.body).unwrap();
    let mut expected = fixture_json("conversions/purchase_expected_meta_body.json");
    expected["data"][0]["event_time"] = json!(event_time);
    assert_eq!(sent, expected);
    assert!(sent["data"][0].get("page_id").is_none());
    assert!(!received.url.as_str().contains(ACCESS_TOKEN));
    assert!(received.url.query().is_none());
    assert!(!String::from_utf8_lossy(&received.body).contains(ACCESS_TOKEN));
    // Plain customer data never leaves in clear.
    let raw = String::from_utf8_lossy(&received.body);
    assert!(!raw.to_lowercase().contains("john_smith"));
    assert!(!raw.contains("Customer-42"));
    // The fixture really is the request used.
    assert!(
        String::from_utf8(fixture("conversions/purchase_request.json"))
            .unwrap()
            .contains("John_Smith")
    );
}

#[tokio::test]
async fn each_validation_rule_refuses_with_its_code() {
    let (app, conversation_id) = app_with_click().await;
    Mock::given(method("POST"))
        .respond_with(meta_success("T"))
        .expect(0)
        .mount(&app.graph)
        .await;
    let base = lead(&conversation_id, "validation");
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"eventName": "Lead"}), 400, "invalid_event_name"),
        (json!({"eventName": "Contact"}), 400, "invalid_event_name"),
        (
            json!({"eventName": "MyCustomEvent"}),
            400,
            "invalid_event_name",
        ),
        (json!({"eventId": ""}), 400, "invalid_event_id"),
        (json!({"eventId": "x".repeat(257)}), 400, "invalid_event_id"),
        (
            json!({"eventTime": now() - 8 * 86_400}),
            400,
            "event_time_too_old",
        ),
        (
            json!({"eventTime": now() + 3600}),
            400,
            "event_time_in_future",
        ),
        (
            json!({"eventTime": now() * 1000}),
            400,
            "event_time_in_milliseconds",
        ),
        (json!({"eventTime": "yesterday"}), 400, "invalid_field"),
        (json!({"currency": "usd"}), 200, ""),
        (
            json!({"value": 10, "currency": "ABC"}),
            400,
            "invalid_currency",
        ),
        (
            json!({"value": 10, "currency": "US"}),
            400,
            "invalid_currency",
        ),
        (json!({"value": 10}), 400, "missing_currency"),
        (
            json!({"value": -1, "currency": "USD"}),
            400,
            "invalid_value",
        ),
        (
            json!({"eventName": "Purchase", "currency": "USD"}),
            400,
            "missing_value",
        ),
        (
            json!({"eventName": "Purchase", "value": 10}),
            400,
            "missing_currency",
        ),
        (json!({"conversationId": null}), 400, "missing_conversation"),
        (
            json!({"conversationId": null, "phoneE164": "(650) 555-1234"}),
            400,
            "invalid_phone",
        ),
        (
            json!({"conversationId": null, "phoneE164": "123"}),
            400,
            "invalid_phone",
        ),
        (
            json!({"conversationId": null, "phoneE164": "+16505551234"}),
            400,
            "invalid_phone",
        ),
        (json!({"email": "not-an-email"}), 400, "invalid_email"),
        (json!({"contentIds": [""]}), 400, "invalid_content_ids"),
        (json!({"accountId": "nope"}), 404, "account_not_found"),
        (
            json!({"conversationId": "conv_missing"}),
            404,
            "conversation_not_found",
        ),
        (
            json!({"conversationId": null, "phoneE164": "15550000000"}),
            404,
            "conversation_not_found",
        ),
    ];
    for (change, status, code) in cases {
        let mut body = base.clone();
        for (key, value) in change.as_object().unwrap() {
            body[key] = value.clone();
        }
        body["dryRun"] = json!(true);
        let response = convert(&app, ADMIN_TOKEN, &body).await;
        assert_eq!(response.status().as_u16(), status, "{change}");
        let answer: Value = response.json().await.unwrap();
        if status >= 400 {
            assert_eq!(answer["code"], code, "{change}: {answer}");
            assert!(
                answer["error"].as_str().is_some_and(|m| !m.is_empty()),
                "{change}"
            );
        }
    }
    for missing in ["accountId", "eventName", "eventId"] {
        let mut body = base.clone();
        body.as_object_mut().unwrap().remove(missing);
        let response = convert(&app, ADMIN_TOKEN, &body).await;
        assert_eq!(response.status(), 400, "{missing}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["code"], "missing_field", "{missing}");
        assert!(answer["error"].as_str().unwrap().contains(missing));
    }
    let lead_hint: Value = convert(&app, ADMIN_TOKEN, &json!({"accountId": SAMPLE_ACCOUNT_ID, "eventName": "Lead", "eventId": "x", "conversationId": conversation_id}))
        .await
        .json()
        .await
        .unwrap();
    assert!(lead_hint["error"]
        .as_str()
        .unwrap()
        .contains("LeadSubmitted"));
}

#[tokio::test]
async fn phone_lookup_takes_the_most_recent_attributed_conversation() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let day = 86_400;
    let first = click(
        &app,
        "wamid.P1",
        SAMPLE_PHONE,
        now() - 6 * day - 3600,
        Some("CLID-FIRST"),
    )
    .await;
    // Eight days later than the first click would be the future; instead, the second click is a
    // day later and stays in the first conversation, and a third user's number is unrelated.
    let same = click(
        &app,
        "wamid.P2",
        SAMPLE_PHONE,
        now() - 5 * day,
        Some("CLID-INSIDE-WINDOW"),
    )
    .await;
    assert_eq!(first, same);
    let other_phone = click(
        &app,
        "wamid.P3",
        "15550001111",
        now() - 3600,
        Some("CLID-OTHER-USER"),
    )
    .await;
    assert_ne!(other_phone, first);

    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("T"))
        .expect(1)
        .mount(&app.graph)
        .await;
    let response = convert(
        &app,
        ADMIN_TOKEN,
        &json!({"accountId": SAMPLE_ACCOUNT_ID, "eventName": "LeadSubmitted", "eventId": "by-phone", "phoneE164": SAMPLE_PHONE}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let sent: Value =
        serde_json::from_slice(&app.graph.received_requests().await.unwrap()[0].body).unwrap();
    // First touch inside the conversation.
    assert_eq!(sent["data"][0]["user_data"]["ctwa_clid"], "CLID-FIRST");
}

#[tokio::test]
async fn phone_lookup_prefers_the_later_of_several_attributed_conversations() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let day = 86_400;
    // A click 20 days ago, then one 2 days ago: outside the window, so a second conversation.
    let old = click(
        &app,
        "wamid.Q1",
        SAMPLE_PHONE,
        now() - 20 * day,
        Some("CLID-OLD"),
    )
    .await;
    let recent = click(
        &app,
        "wamid.Q2",
        SAMPLE_PHONE,
        now() - 2 * day,
        Some("CLID-RECENT"),
    )
    .await;
    assert_ne!(old, recent);
    // A later organic message joins the recent conversation; a status ad joins it too.
    let webhook = messages_webhook(&[("wamid.Q3", SAMPLE_PHONE, now() - day, None)]);
    app.post_webhook_json(&webhook).await;

    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("T"))
        .expect(1)
        .mount(&app.graph)
        .await;
    let response = convert(
        &app,
        ADMIN_TOKEN,
        &json!({"accountId": SAMPLE_ACCOUNT_ID, "eventName": "QualifiedLead", "eventId": "q", "phoneE164": SAMPLE_PHONE}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["conversationId"], recent);
    let sent: Value =
        serde_json::from_slice(&app.graph.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(sent["data"][0]["user_data"]["ctwa_clid"], "CLID-RECENT");
}

#[tokio::test]
async fn organic_and_status_ad_conversations_have_no_click_id_to_send() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    Mock::given(method("POST"))
        .respond_with(meta_success("T"))
        .expect(0)
        .mount(&app.graph)
        .await;
    let organic_webhook = messages_webhook(&[("wamid.O1", "15550002222", now() - 60, None)]);
    app.post_webhook_json(&organic_webhook).await;
    let organic = latest_conversation(&app, "15550002222").await;
    let status_ad = click(&app, "wamid.S1", "15550003333", now() - 60, None).await;

    for (conversation_id, phone, reason) in [
        (&organic, "15550002222", "organic"),
        (&status_ad, "15550003333", "Status"),
    ] {
        let by_id = convert(&app, ADMIN_TOKEN, &lead(conversation_id, "e1")).await;
        assert_eq!(by_id.status(), 422);
        let body: Value = by_id.json().await.unwrap();
        assert_eq!(body["code"], "no_ctwa_clid");
        assert!(body["error"].as_str().unwrap().contains(reason), "{body}");

        let by_phone = convert(
            &app,
            ADMIN_TOKEN,
            &json!({"accountId": SAMPLE_ACCOUNT_ID, "eventName": "LeadSubmitted", "eventId": "e2", "phoneE164": phone}),
        )
        .await;
        assert_eq!(by_phone.status(), 422);
        assert_eq!(
            by_phone.json::<Value>().await.unwrap()["code"],
            "no_ctwa_clid"
        );
    }
}

#[tokio::test]
async fn an_account_without_a_dataset_is_422() {
    let (app, conversation_id) = app_with_click().await;
    let patch = app
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
            Some(ADMIN_TOKEN),
            &json!({"metadata": {"metaCapiDatasetId": null}}),
        )
        .await;
    assert_eq!(patch.status(), 200);
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "no-dataset")).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "dataset_not_configured");
}

#[tokio::test]
async fn the_same_event_twice_is_sent_once() {
    let (app, conversation_id) = app_with_click().await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("TRACE-ONCE"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&app.graph)
        .await;
    let first = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "dup-1")).await;
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    assert!(first.get("deduplicated").is_none());
    let second = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "dup-1")).await;
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["deduplicated"], true);
    assert_eq!(second["traceId"], "TRACE-ONCE");
    assert_eq!(second["eventsReceived"], 1);
    // Another event name with the same id is another event.
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("TRACE-OTHER"))
        .expect(1)
        .mount(&app.graph)
        .await;
    let mut other = lead(&conversation_id, "dup-1");
    other["eventName"] = json!("QualifiedLead");
    assert_eq!(convert(&app, ADMIN_TOKEN, &other).await.status(), 200);
}

#[tokio::test]
async fn after_a_permanent_failure_the_same_id_may_be_sent_again() {
    let (app, conversation_id) = app_with_click().await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {"message": "Error validating access token", "type": "OAuthException", "code": 190, "error_subcode": 463, "fbtrace_id": "TRACE-190"}})))
        .up_to_n_times(1)
        .expect(1)
        .mount(&app.graph)
        .await;
    let failed: Value = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "retry-me"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(failed["status"], "failed");
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("TRACE-FIXED"))
        .expect(1)
        .mount(&app.graph)
        .await;
    let retried = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "retry-me")).await;
    assert_eq!(retried.status(), 200);
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(retried["status"], "sent");
    assert_eq!(retried["traceId"], "TRACE-FIXED");
    assert!(retried.get("deduplicated").is_none());
}

#[tokio::test]
async fn a_dry_run_shows_the_request_and_sends_nothing() {
    let (app, conversation_id) = app_with_click().await;
    Mock::given(method("POST"))
        .respond_with(meta_success("T"))
        .expect(0)
        .mount(&app.graph)
        .await;
    let mut body = lead(&conversation_id, "dry");
    body["dryRun"] = json!(true);
    body["email"] = json!("John_Smith@gmail.com");
    let response = convert(&app, ADMIN_TOKEN, &body).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains(ACCESS_TOKEN));
    assert!(!text.contains("John_Smith"));
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["dryRun"], true);
    assert_eq!(answer["request"]["method"], "POST");
    assert_eq!(
        answer["request"]["url"],
        format!("{}{}", app.graph.uri(), events_path())
    );
    assert_eq!(
        answer["request"]["headers"]["Authorization"],
        "Bearer [REDACTED]"
    );
    assert_eq!(
        answer["request"]["body"]["data"][0]["user_data"]["ctwa_clid"],
        SAMPLE_CLID
    );
    assert_eq!(
        answer["request"]["body"]["data"][0]["user_data"]["em"][0],
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
    );
    let history: Value = app
        .get(
            &format!("/v1/whatsapp/conversions?accountId={SAMPLE_ACCOUNT_ID}"),
            Some(ADMIN_TOKEN),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(history["events"], json!([]));
}

#[tokio::test]
async fn an_event_later_than_the_window_after_the_click_is_sent_with_a_warning() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let conversation_id = click(
        &app,
        "wamid.W1",
        SAMPLE_PHONE,
        now() - 8 * 86_400,
        Some("CLID-OLD-CLICK"),
    )
    .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("T"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&app.graph)
        .await;
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "late")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["warnings"], json!(["outside_attribution_window"]));
    let inside = click(
        &app,
        "wamid.W2",
        "15550004444",
        now() - 3600,
        Some("CLID-FRESH"),
    )
    .await;
    let fresh: Value = {
        Mock::given(method("POST"))
            .and(path(events_path()))
            .respond_with(meta_success("T2"))
            .expect(1)
            .mount(&app.graph)
            .await;
        convert(&app, ADMIN_TOKEN, &lead(&inside, "fresh"))
            .await
            .json()
            .await
            .unwrap()
    };
    assert_eq!(fresh["warnings"], json!([]));
}

#[tokio::test]
async fn scoped_keys_cannot_send_for_or_read_other_accounts() {
    let (app, conversation_id) = app_with_click().await;
    let other = app
        .admin_post(
            "/v1/admin/accounts",
            &json!({"id": "acc_other", "phoneNumberId": "111111111111111", "wabaId": "222222222222222", "accessToken": "EAAG-other", "metadata": {"metaCapiDatasetId": "333"}}),
        )
        .await;
    assert_eq!(other.status(), 201);
    let other_key = app.create_key(&["acc_other"]).await;
    Mock::given(method("POST"))
        .respond_with(meta_success("T"))
        .expect(0)
        .mount(&app.graph)
        .await;

    let send = convert(&app, &other_key, &lead(&conversation_id, "scoped")).await;
    assert_eq!(send.status(), 404);
    assert_eq!(
        send.json::<Value>().await.unwrap()["code"],
        "account_not_found"
    );
    let history = app
        .get(
            &format!("/v1/whatsapp/conversions?accountId={SAMPLE_ACCOUNT_ID}"),
            Some(&other_key),
        )
        .await;
    assert_eq!(history.status(), 404);
    let dataset = app
        .get(
            &format!("/v1/whatsapp/dataset?accountId={SAMPLE_ACCOUNT_ID}"),
            Some(&other_key),
        )
        .await;
    assert_eq!(dataset.status(), 404);
    // The conversation of the sample account is not reachable through the other account either.
    let mut cross = lead(&conversation_id, "cross");
    cross["accountId"] = json!("acc_other");
    let cross = convert(&app, &other_key, &cross).await;
    assert_eq!(cross.status(), 404);
    assert_eq!(
        cross.json::<Value>().await.unwrap()["code"],
        "conversation_not_found"
    );
}

#[tokio::test]
async fn automatic_events_are_forwarded_once_when_the_account_opts_in() {
    let app = spawn_app().await;
    app.register_sample_account().await;
    let patch = app
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
            Some(ADMIN_TOKEN),
            &json!({"forwardAutomaticEvents": true}),
        )
        .await;
    assert_eq!(patch.status(), 200);
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("TRACE-AUTO"))
        .expect(1)
        .mount(&app.graph)
        .await;
    click(
        &app,
        "wamid.AUTO",
        SAMPLE_PHONE,
        now() - 600,
        Some("CLID-AUTO"),
    )
    .await;
    let mut event = crate::helpers::automatic_event_webhook(
        "wamid.AUTO",
        "Purchase",
        Some("CLID-AUTO"),
        Some(25000),
    );
    event["entry"][0]["changes"][0]["value"]["automatic_events"][0]["timestamp"] =
        json!(now() - 300);
    assert_eq!(app.post_webhook_json(&event).await.status(), 200);
    assert_eq!(app.post_webhook_json(&event).await.status(), 200);

    let history = deliver_until_status(&app, "sent").await;
    let item = &history["events"][0];
    assert_eq!(item["eventName"], "Purchase");
    assert_eq!(item["source"], "automatic_event");
    let sent: Value =
        serde_json::from_slice(&app.graph.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(
        sent["data"][0]["messaging_outcome_data"],
        json!({"outcome_type": "automatic_events"})
    );
    assert_eq!(
        sent["data"][0]["custom_data"],
        json!({"value": 25.0, "currency": "USD"})
    );
    assert_eq!(sent["data"][0]["user_data"]["ctwa_clid"], "CLID-AUTO");
}

/// Runs outbox passes until the newest event of the sample account has `status`, and returns
/// the history then. Before each pass the app's clock moves a minute ahead, past every backoff
/// and resend guard of the test settings, so each pass tries every queued record once.
pub async fn deliver_until_status(app: &TestApp, status: &str) -> Value {
    const PASSES: usize = 20;
    for _ in 0..=PASSES {
        let history: Value = app
            .get(
                &format!("/v1/whatsapp/conversions?accountId={SAMPLE_ACCOUNT_ID}"),
                Some(ADMIN_TOKEN),
            )
            .await
            .json()
            .await
            .unwrap();
        if history["events"][0]["status"] == status {
            return history;
        }
        app.clock.advance(chrono::Duration::minutes(1));
        app.run_outbox_once().await;
    }
    panic!("no conversion reached status {status} in {PASSES} outbox passes");
}
