//! The real binary, killed and restarted on the same data directory: every webhook answered 200
//! survives (SPEC §3), and SIGTERM stops it cleanly (SPEC §4.7).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    messages_webhook, referral, sign, ACCESS_TOKEN, ADMIN_TOKEN, APP_SECRET, SAMPLE_ACCOUNT_ID,
    SAMPLE_DATASET_ID, SAMPLE_PHONE_NUMBER_ID, SAMPLE_WABA_ID, VERIFY_TOKEN,
};
use crate::server::{RunningServer, EXIT_TIMEOUT};

/// The API-specific side of the shared child-process helper: the test secrets, no Graph API
/// unless a test gives one, and the sample account.
impl RunningServer {
    async fn start(data_dir: &Path) -> RunningServer {
        RunningServer::start_with(data_dir, &[]).await
    }

    /// Starts the server with extra environment variables (they override the test defaults).
    async fn start_with(data_dir: &Path, extra_env: &[(&str, String)]) -> RunningServer {
        let mut env = vec![
            ("CTWA_APP_SECRETS", APP_SECRET.to_string()),
            ("CTWA_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("CTWA_VERIFY_TOKEN", VERIFY_TOKEN.to_string()),
            ("CTWA_GRAPH_URL", "http://127.0.0.1:9".to_string()),
        ];
        env.extend(extra_env.iter().cloned());
        RunningServer::launch(data_dir, &env).await
    }

    async fn register_sample_account(&self) {
        self.create_account(
            ADMIN_TOKEN,
            &json!({
                "id": SAMPLE_ACCOUNT_ID,
                "phoneNumberId": SAMPLE_PHONE_NUMBER_ID,
                "wabaId": SAMPLE_WABA_ID,
                "accessToken": ACCESS_TOKEN,
                "metadata": {"metaCapiDatasetId": SAMPLE_DATASET_ID}
            }),
        )
        .await;
    }

    /// The sample account's newest conversion once it has `status`, polled every 50 ms up to
    /// `tries` times; `Null` if it never does.
    async fn newest_conversion_once(&self, status: &str, tries: usize) -> Value {
        for _ in 0..tries {
            let history: Value = self
                .client
                .get(self.url(&format!(
                    "/v1/whatsapp/conversions?accountId={SAMPLE_ACCOUNT_ID}"
                )))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if history["events"][0]["status"] == status {
                return history["events"][0].clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Value::Null
    }

    /// Sends every body concurrently, signed, and checks each is answered exactly 200.
    async fn post_webhooks_concurrently(&self, bodies: Vec<Vec<u8>>) {
        let mut posts = tokio::task::JoinSet::new();
        for body in bodies {
            let request = self
                .client
                .post(self.url("/webhooks/whatsapp"))
                .header("content-type", "application/json")
                .header("X-Hub-Signature-256", sign(&body))
                .body(body);
            posts.spawn(async move {
                request
                    .send()
                    .await
                    .map(|response| response.status().as_u16())
            });
        }
        while let Some(outcome) = posts.join_next().await {
            let status = outcome
                .expect("the request task")
                .expect("the server answers");
            assert_eq!(
                status,
                200,
                "a webhook was not acknowledged:\n{}",
                self.log()
            );
        }
    }

    /// The sample account's conversations of `phone`.
    async fn conversations(&self, phone: &str) -> Vec<Value> {
        let response = self
            .client
            .get(self.url(&format!("/v1/whatsapp/attribution?phone={phone}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("the server answers");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|result| result["accountId"] == SAMPLE_ACCOUNT_ID)
            .flat_map(|result| result["conversations"].as_array().unwrap().clone())
            .collect()
    }
}

struct Click {
    wamid: String,
    phone: String,
    ctwa_clid: String,
}

fn clicks(count: usize, tag: &str) -> Vec<Click> {
    (0..count)
        .map(|index| Click {
            wamid: format!("wamid.{tag}-{index:04}"),
            phone: format!("1555{index:07}"),
            ctwa_clid: format!("CLID-{tag}-{index:04}-Aff-n8ZTODiE79d22KtAwQKj9e"),
        })
        .collect()
}

fn webhook_bodies(clicks: &[Click]) -> Vec<Vec<u8>> {
    clicks
        .iter()
        .enumerate()
        .map(|(index, click)| {
            let body = messages_webhook(&[(
                click.wamid.as_str(),
                click.phone.as_str(),
                1_750_000_000 + index as i64,
                Some(referral(Some(&click.ctwa_clid), "ad-durable")),
            )]);
            serde_json::to_vec(&body).unwrap()
        })
        .collect()
}

async fn assert_every_click_is_attributed(server: &RunningServer, clicks: &[Click]) {
    for click in clicks {
        let conversations = server.conversations(&click.phone).await;
        assert_eq!(
            conversations.len(),
            1,
            "{} lost after restart: {conversations:#?}",
            click.wamid
        );
        let metadata = &conversations[0]["metadata"];
        assert_eq!(metadata["ctwa_clid"], click.ctwa_clid.as_str());
        assert_eq!(metadata["ctwa_message_id"], click.wamid.as_str());
        assert_eq!(metadata["ctwa_source_id"], "ad-durable");
    }
}

#[tokio::test]
async fn every_acknowledged_webhook_survives_sigkill() {
    let data_dir = tempfile::tempdir().unwrap();
    let clicks = clicks(50, "KILL");
    {
        let mut server = RunningServer::start(data_dir.path()).await;
        server.register_sample_account().await;
        server
            .post_webhooks_concurrently(webhook_bodies(&clicks))
            .await;
        // No grace: whatever was answered 200 must already be on disk.
        server.kill_hard().await;
    }

    let server = RunningServer::start(data_dir.path()).await;
    assert_every_click_is_attributed(&server, &clicks).await;

    // The restarted server still deduplicates what it acknowledged before the crash.
    server
        .post_webhooks_concurrently(webhook_bodies(&clicks[..5]))
        .await;
    for click in &clicks[..5] {
        let conversations = server.conversations(&click.phone).await;
        assert_eq!(conversations.len(), 1);
        assert_eq!(conversations[0]["messageCount"], 1);
        assert_eq!(conversations[0]["clicks"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn sigterm_exits_cleanly_and_keeps_the_data() {
    let data_dir = tempfile::tempdir().unwrap();
    let clicks = clicks(20, "TERM");
    {
        let mut server = RunningServer::start(data_dir.path()).await;
        server.register_sample_account().await;
        server
            .post_webhooks_concurrently(webhook_bodies(&clicks))
            .await;
        server.terminate();
        let status = server.wait_for_exit(EXIT_TIMEOUT).await;
        assert!(
            status.success(),
            "SIGTERM exit status {status:?}:\n{}",
            server.log()
        );
    }

    let server = RunningServer::start(data_dir.path()).await;
    assert_every_click_is_attributed(&server, &clicks).await;
    // The account came back too.
    let response = server
        .client
        .get(server.url(&format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// SPEC §5.6: a conversion answered 202 during an outage is durable in the outbox, and the
/// worker of the next process delivers it once Meta is back.
#[tokio::test]
async fn a_queued_conversion_is_delivered_by_the_outbox_after_a_restart() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let graph = MockServer::builder().start().await;
    let events_path = format!("/v25.0/{SAMPLE_DATASET_ID}/events");
    Mock::given(method("POST"))
        .and(path(events_path.clone()))
        .respond_with(ResponseTemplate::new(503))
        .mount(&graph)
        .await;
    let data_dir = tempfile::tempdir().unwrap();
    let env = [
        ("CTWA_GRAPH_URL", graph.uri()),
        ("CTWA_DELIVERY_BUDGET_MS", "400".to_string()),
        ("CTWA_OUTBOX_POLL_INTERVAL_MS", "100".to_string()),
        ("CTWA_OUTBOX_BACKOFF_BASE_MS", "100".to_string()),
        ("CTWA_OUTBOX_BACKOFF_MAX_MS", "200".to_string()),
    ];

    let mut first = RunningServer::start_with(data_dir.path(), &env).await;
    first.register_sample_account().await;
    let now = chrono::Utc::now().timestamp();
    let webhook = messages_webhook(&[(
        "wamid.RESTART",
        "15557654321",
        now - 60,
        Some(referral(Some("CLID-RESTART"), "ad-restart")),
    )]);
    first
        .post_webhooks_concurrently(vec![serde_json::to_vec(&webhook).unwrap()])
        .await;
    let response = first
        .client
        .post(first.url("/v1/whatsapp/conversions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({
            "accountId": SAMPLE_ACCOUNT_ID,
            "eventName": "LeadSubmitted",
            "eventId": "lead-during-outage",
            "phoneE164": "15557654321"
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", first.log());
    first.kill_hard().await;

    // Meta is back; only the restarted process can deliver the event.
    graph.reset().await;
    Mock::given(method("POST"))
        .and(path(events_path))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"events_received": 1, "messages": [], "fbtrace_id": "AFTER-RESTART"}),
        ))
        .expect(1)
        .mount(&graph)
        .await;
    let second = RunningServer::start_with(data_dir.path(), &env).await;
    let delivered = second.newest_conversion_once("sent", 200).await;
    assert_eq!(delivered["traceId"], "AFTER-RESTART", "{}", second.log());
    assert_eq!(delivered["eventId"], "lead-during-outage");
    let sent: Value =
        serde_json::from_slice(&graph.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(sent["data"][0]["user_data"]["ctwa_clid"], "CLID-RESTART");
    graph.verify().await;
}

/// Issue 6: a conversion is durable before it is sent. The process is killed while Meta holds
/// the request: after the restart the record is there, a client's retry is deduplicated, and
/// the event is sent exactly once more, flagged possibleDuplicate, after the guard interval.
#[tokio::test]
async fn a_conversion_cut_off_mid_send_is_kept_and_resent_once_flagged() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let graph = MockServer::builder().start().await;
    let events_path = format!("/v25.0/{SAMPLE_DATASET_ID}/events");
    let success = ResponseTemplate::new(200)
        .set_body_json(json!({"events_received": 1, "messages": [], "fbtrace_id": "AFTER-CUT"}));
    Mock::given(method("POST"))
        .and(path(events_path.clone()))
        .respond_with(success.clone().set_delay(Duration::from_secs(60)))
        .mount(&graph)
        .await;
    let data_dir = tempfile::tempdir().unwrap();
    let env = [
        ("CTWA_GRAPH_URL", graph.uri()),
        ("CTWA_GRAPH_TIMEOUT_MS", "3000".to_string()),
        ("CTWA_DELIVERY_BUDGET_MS", "400".to_string()),
        ("CTWA_OUTBOX_POLL_INTERVAL_MS", "100".to_string()),
        ("CTWA_UNKNOWN_RESEND_AFTER_MS", "300".to_string()),
    ];
    let mut first = RunningServer::start_with(data_dir.path(), &env).await;
    first.register_sample_account().await;
    let webhook = messages_webhook(&[(
        "wamid.CUT",
        "15557650000",
        chrono::Utc::now().timestamp() - 60,
        Some(referral(Some("CLID-CUT"), "ad-cut")),
    )]);
    first
        .post_webhooks_concurrently(vec![serde_json::to_vec(&webhook).unwrap()])
        .await;
    let lead = json!({
        "accountId": SAMPLE_ACCOUNT_ID,
        "eventName": "LeadSubmitted",
        "eventId": "lead-cut-off",
        "phoneE164": "15557650000"
    });
    let request = first
        .client
        .post(first.url("/v1/whatsapp/conversions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&lead)
        .send();
    let client = tokio::spawn(request);
    for _ in 0..400 {
        if !graph.received_requests().await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(graph.received_requests().await.unwrap().len(), 1);
    // Meta has the request; the client never gets its answer.
    first.kill_hard().await;
    assert!(client.await.unwrap().is_err());

    graph.reset().await;
    Mock::given(method("POST"))
        .and(path(events_path))
        .respond_with(success)
        .expect(1)
        .mount(&graph)
        .await;
    // The default Graph timeout again, so the lease of the cut-off attempt passes quickly.
    let env = [&env[..1], &env[2..]].concat();
    let second = RunningServer::start_with(data_dir.path(), &env).await;
    let retry: Value = second
        .client
        .post(second.url("/v1/whatsapp/conversions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&lead)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(retry["deduplicated"], true, "{retry}");
    let settled = second.newest_conversion_once("sent", 600).await;
    assert_eq!(settled["traceId"], "AFTER-CUT", "{}", second.log());
    assert_eq!(settled["possibleDuplicate"], true);
    assert_eq!(settled["attempts"], 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    graph.verify().await;
}
