//! How each of Meta's answers is classified, retried, queued, expired and kept in the history.

use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::conversions::{
    app_with_click, app_with_click_using, click, convert, deliver_until_status, events_path, lead,
    meta_success, now,
};
use crate::helpers::{spawn_app_with, TestApp, ADMIN_TOKEN, SAMPLE_ACCOUNT_ID, SAMPLE_PHONE};

/// A short request budget, for tests that wait for it to run out.
fn short_budget(settings: &mut ctwa_relay::settings::Settings) {
    settings.delivery_budget = Duration::from_millis(700);
}

fn meta_error(
    http_status: u16,
    code: i64,
    subcode: Option<i64>,
    message: &str,
) -> ResponseTemplate {
    let mut error = json!({"message": message, "type": "OAuthException", "code": code, "fbtrace_id": format!("TRACE-{code}")});
    if let Some(subcode) = subcode {
        error["error_subcode"] = json!(subcode);
    }
    ResponseTemplate::new(http_status).set_body_json(json!({ "error": error }))
}

async fn history(app: &TestApp) -> Value {
    app.get(
        &format!("/v1/whatsapp/conversions?accountId={SAMPLE_ACCOUNT_ID}"),
        Some(ADMIN_TOKEN),
    )
    .await
    .json()
    .await
    .unwrap()
}

#[tokio::test]
async fn permanent_meta_errors_fail_at_once_with_an_actionable_message() {
    let cases = [
        (meta_error(400, 100, Some(33), "Unsupported post request. Object with ID '1' does not exist, cannot be loaded due to missing permissions"), "100", "Share the dataset"),
        (meta_error(400, 100, Some(2804066), "Messaging Event Invalid Event Type"), "100", "LeadSubmitted"),
        (meta_error(400, 100, Some(2804003), "Event Timestamp Too Old"), "100", "7 days"),
        (meta_error(400, 100, Some(2804087), "Invalid ctwa_clid"), "100", "click id"),
        (meta_error(400, 190, Some(463), "Error validating access token: Session has expired"), "190", "accessToken"),
        (meta_error(403, 10, None, "Application does not have permission for this action"), "10", "permission"),
        (meta_error(403, 200, None, "Permissions error"), "200", "permission"),
    ];
    for (template, code, hint) in cases {
        let (app, conversation_id) = app_with_click().await;
        Mock::given(method("POST"))
            .and(path(events_path()))
            .respond_with(template)
            .expect(1)
            .mount(&app.graph)
            .await;
        let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "permanent")).await;
        assert_eq!(response.status(), 200, "{code}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["eventsReceived"], 0, "{code}");
        assert_eq!(body["eventsFailed"], 1, "{code}");
        assert_eq!(body["status"], "failed", "{code}");
        let failure = &body["failures"][0];
        assert_eq!(failure["eventIndex"], 0);
        assert_eq!(failure["eventId"], "permanent");
        assert_eq!(failure["code"], code);
        assert!(
            failure["message"].as_str().unwrap().contains(hint),
            "{code}: {failure}"
        );
        assert_eq!(body["traceId"], format!("TRACE-{code}"));
        app.graph.verify().await;
    }
}

#[tokio::test]
async fn transient_meta_errors_are_retried_then_queued_with_202() {
    let cases = [
        (
            meta_error(400, 4, None, "Application request limit reached"),
            "4",
        ),
        (
            meta_error(400, 17, None, "User request limit reached"),
            "17",
        ),
        (
            meta_error(
                400,
                613,
                None,
                "Calls to this api have exceeded the rate limit",
            ),
            "613",
        ),
        (
            meta_error(
                400,
                80004,
                None,
                "There have been too many calls to this ad-account",
            ),
            "80004",
        ),
        (
            meta_error(500, 2, None, "Service temporarily unavailable"),
            "2",
        ),
        (ResponseTemplate::new(503), "http_503"),
        (
            ResponseTemplate::new(502).set_body_string("<html>Bad gateway</html>"),
            "http_502",
        ),
    ];
    for (template, code) in cases {
        let (app, conversation_id) = app_with_click_using(short_budget).await;
        Mock::given(method("POST"))
            .and(path(events_path()))
            .respond_with(template)
            .mount(&app.graph)
            .await;
        let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "transient")).await;
        assert_eq!(response.status(), 202, "{code}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["queued"], true);
        assert_eq!(body["status"], "queued");
        assert_eq!(body["platform"], "metaads");
        assert_eq!(body["lastError"]["code"], code);
        let attempts = app.graph.received_requests().await.unwrap().len();
        assert!(
            attempts >= 2,
            "{code}: retried inside the request, {attempts} attempts"
        );
    }
}

#[tokio::test]
async fn a_timeout_is_transient() {
    let (app, conversation_id) = app_with_click_using(|settings| {
        settings.graph_timeout = Duration::from_millis(300);
        short_budget(settings);
    })
    .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("LATE").set_delay(Duration::from_secs(2)))
        .mount(&app.graph)
        .await;
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "slow")).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["lastError"]["code"], "timeout");
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_app_with(|settings| {
        settings.graph_url = format!("http://127.0.0.1:{closed_port}").parse().unwrap();
        short_budget(settings);
    })
    .await;
    app.register_sample_account().await;
    let conversation_id = click(
        &app,
        "wamid.REFUSED",
        SAMPLE_PHONE,
        now() - 60,
        Some("CLID"),
    )
    .await;
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "refused")).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["lastError"]["code"], "connection_error");
}

#[tokio::test]
async fn a_malformed_answer_or_zero_events_received_is_a_failure_not_retried() {
    for (template, code) in [
        (
            ResponseTemplate::new(200).set_body_string("<html>ok</html>"),
            "malformed_response",
        ),
        (
            ResponseTemplate::new(200).set_body_json(
                json!({"events_received": 0, "messages": [], "fbtrace_id": "TRACE-ZERO"}),
            ),
            "events_received_zero",
        ),
    ] {
        let (app, conversation_id) = app_with_click().await;
        Mock::given(method("POST"))
            .and(path(events_path()))
            .respond_with(template)
            .expect(1)
            .mount(&app.graph)
            .await;
        let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "odd")).await;
        assert_eq!(response.status(), 200, "{code}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["eventsFailed"], 1, "{code}");
        assert_eq!(body["failures"][0]["code"], code);
        app.graph.verify().await;
    }
}

#[tokio::test]
async fn a_transient_failure_then_success_is_sent_inside_the_request() {
    let (app, conversation_id) = app_with_click().await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .expect(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("AFTER-RETRY"))
        .expect(1)
        .mount(&app.graph)
        .await;
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "flaky")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "sent");
    assert_eq!(body["traceId"], "AFTER-RETRY");
    let history = history(&app).await;
    assert_eq!(history["events"][0]["attempts"], 2);
    assert_eq!(history["events"][0]["status"], "sent");
}

#[tokio::test]
async fn the_outbox_delivers_after_an_outage_ends() {
    let (app, conversation_id) = app_with_click_using(short_budget).await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(4)
        .mount(&app.graph)
        .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("FROM-OUTBOX"))
        .expect(1)
        .mount(&app.graph)
        .await;
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "outage")).await;
    assert_eq!(response.status(), 202);
    let history = deliver_until_status(&app, "sent").await;
    let item = &history["events"][0];
    assert_eq!(item["traceId"], "FROM-OUTBOX");
    assert!(item["attempts"].as_u64().unwrap() >= 5);
    // A repeat after delivery is deduplicated, not sent.
    let repeat: Value = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "outage"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(repeat["deduplicated"], true);
    assert_eq!(repeat["status"], "sent");
}

#[tokio::test]
async fn a_repeat_while_queued_is_not_sent_again() {
    let (app, conversation_id) = app_with_click_using(|settings| {
        short_budget(settings);
        // The outbox's next try is an hour away, so any send after the 202 is the repeat's.
        settings.outbox_backoff_base = Duration::from_secs(3600);
        settings.outbox_backoff_max = Duration::from_secs(3600);
    })
    .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(ResponseTemplate::new(503))
        .mount(&app.graph)
        .await;
    assert_eq!(
        convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "q"))
            .await
            .status(),
        202
    );
    let before = app.graph.received_requests().await.unwrap().len();
    let repeat = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "q")).await;
    assert_eq!(repeat.status(), 202);
    let repeat: Value = repeat.json().await.unwrap();
    assert_eq!(repeat["deduplicated"], true);
    assert_eq!(repeat["queued"], true);
    // The repeat sent nothing.
    let after = app.graph.received_requests().await.unwrap().len();
    assert_eq!(after, before, "the repeat sent the queued event again");
}

#[tokio::test]
async fn a_conversion_still_queued_after_seven_days_expires() {
    let (app, conversation_id) = app_with_click_using(short_budget).await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(ResponseTemplate::new(503))
        .mount(&app.graph)
        .await;
    let mut body = lead(&conversation_id, "too-late");
    body["eventTime"] = json!(now() - 6 * 86_400);
    assert_eq!(convert(&app, ADMIN_TOKEN, &body).await.status(), 202);
    // Two days pass while Meta is down: the event is now older than Meta accepts.
    app.clock.advance(chrono::Duration::days(2));
    let history = deliver_until_status(&app, "expired").await;
    let item = &history["events"][0];
    assert_eq!(item["eventId"], "too-late");
    assert_eq!(item["errorCode"], "expired");
    // Expired is final: the outbox stops trying.
    let settled = app.graph.received_requests().await.unwrap().len();
    app.clock.advance(chrono::Duration::hours(1));
    app.run_outbox_once().await;
    assert_eq!(app.graph.received_requests().await.unwrap().len(), settled);
}

#[tokio::test]
async fn the_history_shows_every_outcome_newest_first() {
    let (app, conversation_id) = app_with_click_using(short_budget).await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("OK-1"))
        .up_to_n_times(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_error(400, 190, None, "expired token"))
        .up_to_n_times(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(ResponseTemplate::new(503))
        .mount(&app.graph)
        .await;
    assert_eq!(
        convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "h-sent"))
            .await
            .status(),
        200
    );
    assert_eq!(
        convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "h-failed"))
            .await
            .status(),
        200
    );
    assert_eq!(
        convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "h-queued"))
            .await
            .status(),
        202
    );

    let history = history(&app).await;
    let events = history["events"].as_array().unwrap();
    let summary: Vec<(&str, &str)> = events
        .iter()
        .map(|event| {
            (
                event["eventId"].as_str().unwrap(),
                event["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("h-queued", "queued"),
            ("h-failed", "failed"),
            ("h-sent", "sent")
        ]
    );
    let sent = &events[2];
    assert_eq!(sent["eventsReceived"], 1);
    assert_eq!(sent["traceId"], "OK-1");
    assert_eq!(sent["attempts"], 1);
    assert_eq!(sent["conversationId"], conversation_id);
    assert!(sent["durationMs"].is_u64());
    assert_eq!(sent["error"], Value::Null);
    assert!(events[1]["error"].as_str().unwrap().contains("accessToken"));
    assert_eq!(events[1]["errorCode"], "190");

    let limited = app
        .get(
            &format!("/v1/whatsapp/conversions?accountId={SAMPLE_ACCOUNT_ID}&limit=1"),
            Some(ADMIN_TOKEN),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(limited["events"].as_array().unwrap().len(), 1);
    for bad in ["limit=0", "limit=201"] {
        let response = app
            .get(
                &format!("/v1/whatsapp/conversions?accountId={SAMPLE_ACCOUNT_ID}&{bad}"),
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(response.status(), 400, "{bad}");
    }
    // The conversation lookup shows its recent conversions too.
    let conversation: Value = app
        .get(
            &format!("/v1/whatsapp/conversations/{conversation_id}"),
            Some(ADMIN_TOKEN),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        conversation["recentConversions"].as_array().unwrap().len(),
        3
    );
}

/// Answers every Graph call with `template` and notes when each call arrived.
struct TimedResponder {
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    template: ResponseTemplate,
}

impl wiremock::Respond for TimedResponder {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        self.arrivals
            .lock()
            .unwrap()
            .push(std::time::Instant::now());
        self.template.clone()
    }
}

fn graph_calls(app_graph_requests: &[wiremock::Request]) -> usize {
    app_graph_requests
        .iter()
        .filter(|request| request.url.path() == events_path())
        .count()
}

#[tokio::test]
async fn after_a_202_the_first_outbox_retry_comes_one_base_interval_later() {
    let base = Duration::from_millis(1500);
    let (app, conversation_id) = app_with_click_using(|settings| {
        short_budget(settings);
        settings.outbox_backoff_base = base;
        settings.outbox_backoff_max = Duration::from_secs(60);
    })
    .await;
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(TimedResponder {
            arrivals: arrivals.clone(),
            template: ResponseTemplate::new(503),
        })
        .mount(&app.graph)
        .await;
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "backoff")).await;
    assert_eq!(response.status(), 202);
    let in_request = arrivals.lock().unwrap().len();
    assert!(in_request >= 2, "retried inside the request: {in_request}");
    let last_in_request = *arrivals.lock().unwrap().last().unwrap();
    // The in-request attempts do not count toward the outbox's backoff: its first retry comes
    // one base interval after them, not base × 2^(attempts − 1).
    let deadline = std::time::Instant::now() + base * 4;
    while arrivals.lock().unwrap().len() == in_request {
        assert!(
            std::time::Instant::now() < deadline,
            "no outbox retry within {:?}",
            base * 4
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gap = arrivals.lock().unwrap()[in_request] - last_in_request;
    assert!(
        gap >= base - Duration::from_millis(100) && gap < base * 2,
        "first outbox retry came {gap:?} after the last in-request attempt (base {base:?})"
    );
}

#[tokio::test]
async fn an_answer_lost_to_a_timeout_is_resent_once_after_the_guard_then_held_as_unknown() {
    let (app, conversation_id) = app_with_click_using(|settings| {
        settings.graph_timeout = Duration::from_millis(300);
        settings.unknown_resend_after = Duration::from_millis(600);
        short_budget(settings);
    })
    .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("TOO-LATE").set_delay(Duration::from_secs(2)))
        .mount(&app.graph)
        .await;
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "slow-meta")).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["lastError"]["code"], "timeout");
    // Not resent inside the request: Meta may have it.
    assert_eq!(
        graph_calls(&app.graph.received_requests().await.unwrap()),
        1
    );
    let history = deliver_until_status(&app, "unknown").await;
    let item = &history["events"][0];
    assert_eq!(item["attempts"], 2);
    assert_eq!(item["possibleDuplicate"], true);
    assert_eq!(item["errorCode"], "timeout");
    assert!(
        item["error"].as_str().unwrap().contains("Events Manager"),
        "{item}"
    );
    // Held for the operator: nothing more is sent, and a repeat is answered from the record.
    app.clock.advance(chrono::Duration::hours(1));
    app.run_outbox_once().await;
    assert_eq!(
        graph_calls(&app.graph.received_requests().await.unwrap()),
        2
    );
    let repeat: Value = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "slow-meta"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(repeat["deduplicated"], true);
    assert_eq!(repeat["status"], "unknown");
    assert_eq!(repeat["possibleDuplicate"], true);
    let metrics = app.metrics().await;
    assert_eq!(
        crate::helpers::metric_value(&metrics, "ctwa_conversion_possible_duplicates_total"),
        Some(1.0)
    );
    assert!(
        metrics.contains("ctwa_conversions_total{status=\"unknown\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_resend_after_a_lost_answer_that_succeeds_is_sent_and_flagged() {
    let (app, conversation_id) = app_with_click_using(|settings| {
        settings.graph_timeout = Duration::from_millis(300);
        settings.unknown_resend_after = Duration::from_millis(300);
        short_budget(settings);
    })
    .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("LOST").set_delay(Duration::from_secs(2)))
        .up_to_n_times(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("RESENT"))
        .mount(&app.graph)
        .await;
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "once-more")).await;
    assert_eq!(response.status(), 202);
    let history = deliver_until_status(&app, "sent").await;
    let item = &history["events"][0];
    assert_eq!(item["traceId"], "RESENT");
    assert_eq!(item["possibleDuplicate"], true);
    assert_eq!(
        graph_calls(&app.graph.received_requests().await.unwrap()),
        2
    );
}

#[tokio::test]
async fn a_success_that_cannot_be_read_is_unknown_and_never_sent_again() {
    let (app, conversation_id) = app_with_click().await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"events_rec"))
        .expect(1)
        .mount(&app.graph)
        .await;
    let first: Value = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "truncated"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["status"], "unknown");
    assert_eq!(first["failures"][0]["code"], "malformed_response");
    // Meta took the request; a client's retry must not make it count twice.
    let repeat: Value = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "truncated"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(repeat["deduplicated"], true);
    assert_eq!(repeat["status"], "unknown");
    app.clock.advance(chrono::Duration::hours(1));
    app.run_outbox_once().await;
    app.graph.verify().await;
}

#[tokio::test]
async fn a_retry_after_a_refused_resend_stays_flagged_and_shares_the_unknown_budget() {
    let (app, conversation_id) = app_with_click_using(|settings| {
        settings.graph_timeout = Duration::from_millis(300);
        settings.unknown_resend_after = Duration::from_millis(300);
        short_budget(settings);
    })
    .await;
    // The first answer is lost (Meta may hold that copy), the guarded resend is refused.
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("LOST").set_delay(Duration::from_secs(2)))
        .up_to_n_times(1)
        .mount(&app.graph)
        .await;
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"events_received": 0})))
        .up_to_n_times(1)
        .mount(&app.graph)
        .await;
    let response = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "refused-resend")).await;
    assert_eq!(response.status(), 202);
    deliver_until_status(&app, "failed").await;
    // The client tries again: the try goes out flagged, and its answer being lost as well makes
    // the record unknown at once, so Meta never holds more than two copies.
    Mock::given(method("POST"))
        .and(path(events_path()))
        .respond_with(meta_success("LOST-AGAIN").set_delay(Duration::from_secs(2)))
        .mount(&app.graph)
        .await;
    let retry: Value = convert(&app, ADMIN_TOKEN, &lead(&conversation_id, "refused-resend"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(retry["possibleDuplicate"], true, "{retry}");
    let history = deliver_until_status(&app, "unknown").await;
    let item = &history["events"][0];
    assert_eq!(item["possibleDuplicate"], true);
    assert_eq!(item["attempts"], 3);
    app.clock.advance(chrono::Duration::hours(1));
    app.run_outbox_once().await;
    assert_eq!(
        graph_calls(&app.graph.received_requests().await.unwrap()),
        3
    );
}
