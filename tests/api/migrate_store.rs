//! `ctwa-relay migrate-store`: a sled store written by the real server, carried over to redb,
//! is served by the redb server with everything in it; a non-empty target and a missing source
//! are refused.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{
    messages_webhook, referral, sign, ACCESS_TOKEN, ADMIN_TOKEN, APP_SECRET, SAMPLE_ACCOUNT_ID,
    SAMPLE_DATASET_ID, SAMPLE_PHONE_NUMBER_ID, SAMPLE_WABA_ID, VERIFY_TOKEN,
};
use crate::server::{RunningServer, EXIT_TIMEOUT};

const HELD_PHONE_NUMBER_ID: &str = "999000999";

async fn start(data_dir: &Path, engine: &str, graph: &MockServer) -> RunningServer {
    let env = [
        ("CTWA_STORE_ENGINE", engine.to_string()),
        ("CTWA_APP_SECRETS", APP_SECRET.to_string()),
        ("CTWA_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ("CTWA_VERIFY_TOKEN", VERIFY_TOKEN.to_string()),
        ("CTWA_GRAPH_URL", graph.uri()),
    ];
    RunningServer::launch(data_dir, &env).await
}

fn migrate(from: &Path, to: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ctwa-relay"))
        .arg("migrate-store")
        .arg("--from")
        .arg(from)
        .arg("--to")
        .arg(to)
        .env_remove("CTWA_CONFIG")
        .output()
        .expect("ctwa-relay runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The sled and redb counts of `name` in migrate-store's table.
fn counts(printed: &str, name: &str) -> (u64, u64) {
    let line = printed
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name}:\n{printed}"));
    let figures: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|figure| figure.parse().unwrap())
        .collect();
    (figures[0], figures[1])
}

async fn send(
    server: &RunningServer,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut request = server
        .client
        .request(method, server.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.expect("the server answers")
}

async fn post_webhook(server: &RunningServer, webhook: &Value) {
    let body = serde_json::to_vec(webhook).unwrap();
    let response = server
        .client
        .post(server.url("/webhooks/whatsapp"))
        .header("content-type", "application/json")
        .header("X-Hub-Signature-256", sign(&body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", server.log_tail(30));
}

async fn history(server: &RunningServer) -> Value {
    let path = format!("/v1/whatsapp/conversions?accountId={SAMPLE_ACCOUNT_ID}");
    let response = send(server, reqwest::Method::GET, &path, ADMIN_TOKEN, None).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn conversations(server: &RunningServer, phone: &str, token: &str) -> Vec<Value> {
    let path = format!("/v1/whatsapp/attribution?phone={phone}");
    let response = send(server, reqwest::Method::GET, &path, token, None).await;
    assert_eq!(response.status(), 200, "{}", server.log_tail(30));
    let body: Value = response.json().await.unwrap();
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|result| result["conversations"].as_array().unwrap().clone())
        .collect()
}

#[tokio::test]
async fn a_sled_store_is_carried_over_to_redb_and_served_whole() {
    let graph = MockServer::builder().start().await;
    Mock::given(method("POST"))
        .and(path(format!("/v25.0/{SAMPLE_DATASET_ID}/events")))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"events_received": 1, "messages": [], "fbtrace_id": "BEFORE-MIGRATION"}),
        ))
        .expect(1)
        .mount(&graph)
        .await;
    let sled_dir = tempfile::tempdir().unwrap();
    let redb_parent = tempfile::tempdir().unwrap();
    let redb_dir = redb_parent.path().join("redb");
    let now = chrono::Utc::now().timestamp();

    let mut sled = start(sled_dir.path(), "sled", &graph).await;
    sled.create_account(
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
    let response = send(
        &sled,
        reqwest::Method::POST,
        "/v1/admin/api-keys",
        ADMIN_TOKEN,
        Some(&json!({"name": "migrated key", "accountIds": [SAMPLE_ACCOUNT_ID]})),
    )
    .await;
    assert_eq!(response.status(), 201);
    let api_key = response.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    post_webhook(
        &sled,
        &messages_webhook(&[(
            "wamid.MIGRATED",
            "15557654321",
            now - 60,
            Some(referral(Some("CLID-MIGRATED"), "ad-migrated")),
        )]),
    )
    .await;
    let response = send(
        &sled,
        reqwest::Method::POST,
        "/v1/whatsapp/conversions",
        ADMIN_TOKEN,
        Some(&json!({
            "accountId": SAMPLE_ACCOUNT_ID,
            "eventName": "LeadSubmitted",
            "eventId": "lead-before-migration",
            "phoneE164": "15557654321"
        })),
    )
    .await;
    assert!(response.status().is_success(), "{}", sled.log_tail(30));
    for _ in 0..200 {
        if history(&sled).await["events"][0]["status"] == "sent" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent_history = history(&sled).await;
    assert_eq!(
        sent_history["events"][0]["status"], "sent",
        "{sent_history:#}"
    );
    let mut held = messages_webhook(&[(
        "wamid.HELD",
        "15550008000",
        now - 30,
        Some(referral(Some("CLID-HELD"), "ad-held")),
    )]);
    held["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] =
        HELD_PHONE_NUMBER_ID.into();
    post_webhook(&sled, &held).await;
    let attributed = conversations(&sled, "15557654321", &api_key).await;

    // The server holds sled's lock: the migration refuses to copy a store in use.
    let locked = migrate(sled_dir.path(), &redb_dir);
    assert!(!locked.status.success(), "{}", text(&locked));
    assert!(
        text(&locked).contains("is open in another process"),
        "{}",
        text(&locked)
    );
    assert!(!redb_dir.join("ctwa-store.json").exists());
    std::fs::remove_dir_all(&redb_dir).ok();

    sled.terminate();
    assert!(sled.wait_for_exit(EXIT_TIMEOUT).await.success());

    let started = std::time::Instant::now();
    let migrated = migrate(sled_dir.path(), &redb_dir);
    let printed = text(&migrated);
    assert!(migrated.status.success(), "{printed}");
    assert!(started.elapsed() < Duration::from_secs(30), "{printed}");
    assert!(printed.contains("counts match"), "{printed}");
    for (name, at_least) in [
        ("accounts", 1),
        ("api_keys", 1),
        ("journal", 2),
        ("unrouted", 1),
        ("conversations", 1),
        ("conversion_records", 1),
        ("conversion_history", 1),
        ("meta", 1),
    ] {
        let (sled_count, redb_count) = counts(&printed, name);
        assert_eq!(sled_count, redb_count, "{name}:\n{printed}");
        assert!(sled_count >= at_least, "{name}:\n{printed}");
    }
    let marker = std::fs::read_to_string(redb_dir.join("ctwa-store.json")).unwrap();
    assert!(marker.contains("\"engine\":\"redb-3\""), "{marker}");

    let redb = start(&redb_dir, "redb", &graph).await;
    // The account, the key and the attribution.
    let response = send(
        &redb,
        reqwest::Method::GET,
        &format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}"),
        ADMIN_TOKEN,
        None,
    )
    .await;
    assert_eq!(response.status(), 200);
    let account: Value = response.json().await.unwrap();
    assert_eq!(account["phoneNumberId"], SAMPLE_PHONE_NUMBER_ID);
    let after = conversations(&redb, "15557654321", &api_key).await;
    assert_eq!(after, attributed);
    assert_eq!(after[0]["metadata"]["ctwa_clid"], "CLID-MIGRATED");
    // The conversion history, as sent before the migration (and not sent again).
    assert_eq!(history(&redb).await, sent_history);
    // The held webhook: registering its account replays it.
    redb.create_account(
        ADMIN_TOKEN,
        &json!({
            "id": "acc_held",
            "phoneNumberId": HELD_PHONE_NUMBER_ID,
            "wabaId": SAMPLE_WABA_ID,
            "accessToken": ACCESS_TOKEN,
            "metadata": {"metaCapiDatasetId": SAMPLE_DATASET_ID}
        }),
    )
    .await;
    let replayed = conversations(&redb, "15550008000", ADMIN_TOKEN).await;
    assert_eq!(replayed.len(), 1, "{}", redb.log_tail(30));
    assert_eq!(replayed[0]["metadata"]["ctwa_clid"], "CLID-HELD");
    // New webhooks get journal numbers after the migrated ones.
    post_webhook(
        &redb,
        &messages_webhook(&[("wamid.AFTER", "15551112222", now, None)]),
    )
    .await;
    assert_eq!(
        conversations(&redb, "15551112222", ADMIN_TOKEN).await.len(),
        1
    );
    assert_eq!(history(&redb).await, sent_history);
    drop(redb);
    graph.verify().await;
}

#[test]
fn a_non_empty_target_and_a_missing_source_are_refused() {
    let sled_dir = tempfile::tempdir().unwrap();
    drop(ctwa_relay::store::SledStore::open(sled_dir.path()).unwrap());

    let target = tempfile::tempdir().unwrap();
    std::fs::write(target.path().join("ctwa.redb"), b"half a migration").unwrap();
    let refused = migrate(sled_dir.path(), target.path());
    let printed = text(&refused);
    assert!(!refused.status.success(), "{printed}");
    assert!(printed.contains("is not empty (ctwa.redb)"), "{printed}");
    assert!(printed.contains("rm -r"), "{printed}");
    assert_eq!(
        std::fs::read(target.path().join("ctwa.redb")).unwrap(),
        b"half a migration"
    );

    let missing = sled_dir.path().join("no-such-store");
    let new_target = target.path().join("new");
    let refused = migrate(&missing, &new_target);
    let printed = text(&refused);
    assert!(!refused.status.success(), "{printed}");
    assert!(printed.contains("is not a directory"), "{printed}");
    assert!(!missing.exists() && !new_target.exists());

    // A redb store is not migrated again.
    let refused = migrate(&target.path().join("redb-source"), &new_target);
    assert!(!refused.status.success());
    std::fs::create_dir(target.path().join("redb-source")).unwrap();
    std::fs::write(
        target.path().join("redb-source").join("ctwa-store.json"),
        "{\"engine\":\"redb-3\",\"layoutVersion\":1}",
    )
    .unwrap();
    let refused = migrate(&target.path().join("redb-source"), &new_target);
    let printed = text(&refused);
    assert!(!refused.status.success(), "{printed}");
    assert!(printed.contains("already a redb store"), "{printed}");
    assert!(!new_target.exists());

    // An empty directory holds no store: nothing is created in it.
    let empty = tempfile::tempdir().unwrap();
    let refused = migrate(empty.path(), &new_target);
    let printed = text(&refused);
    assert!(!refused.status.success(), "{printed}");
    assert!(printed.contains("holds no sled store"), "{printed}");
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
}
