//! ctwa-relay as the fault tests drive it: the release binary with test secrets, pointed at a
//! fake Graph API, with one account; signed webhooks, conversions and lookups over HTTP.

use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::fake_graph::FakeGraph;
use crate::server::RunningServer;

pub const APP_SECRET: &str = "faults_app_secret";
pub const ADMIN_TOKEN: &str = "faults-admin-token";
pub const VERIFY_TOKEN: &str = "faults-verify";
pub const ACCESS_TOKEN: &str = "EAAG-faults-access-token";
pub const ACCOUNT_ID: &str = "acc_faults";
pub const PHONE_NUMBER_ID: &str = "106540352242922";
pub const WABA_ID: &str = "102290129340398";
pub const DATASET_ID: &str = "987654321098765";

/// Starts the release server on `data_dir`, sending conversions to `graph`; `settings` (such as
/// `CTWA_GRAPH_TIMEOUT_MS`) override the defaults.
pub async fn start(
    data_dir: &Path,
    graph: &FakeGraph,
    settings: &[(&str, String)],
) -> RunningServer {
    let mut env = vec![
        ("CTWA_APP_SECRETS", APP_SECRET.to_string()),
        ("CTWA_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ("CTWA_VERIFY_TOKEN", VERIFY_TOKEN.to_string()),
        ("CTWA_GRAPH_URL", graph.url()),
        // Warnings and errors only: a torture run sends hundreds of thousands of requests.
        ("RUST_LOG", "warn,ctwa_relay=info".to_string()),
    ];
    env.extend(settings.iter().cloned());
    RunningServer::launch(data_dir, &env).await
}

/// A keep-alive client for load and lookups (one connection per request would run out of
/// ephemeral ports in a long run).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub async fn register_account(server: &RunningServer) {
    server
        .create_account(
            ADMIN_TOKEN,
            &json!({
                "id": ACCOUNT_ID,
                "phoneNumberId": PHONE_NUMBER_ID,
                "wabaId": WABA_ID,
                "accessToken": ACCESS_TOKEN,
                "metadata": {"metaCapiDatasetId": DATASET_ID}
            }),
        )
        .await;
}

pub fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A `messages` webhook holding one inbound text message, with a CTWA referral when
/// `ctwa_clid` is given.
pub fn webhook_body(wamid: &str, phone: &str, timestamp: i64, ctwa_clid: Option<&str>) -> Vec<u8> {
    let mut message = json!({
        "from": phone,
        "id": wamid,
        "timestamp": timestamp.to_string(),
        "type": "text",
        "text": {"body": "hello"}
    });
    if let Some(ctwa_clid) = ctwa_clid {
        message["referral"] = json!({
            "source_url": "https://fb.me/faults",
            "source_id": "ad-faults",
            "source_type": "ad",
            "headline": "Chat with us",
            "ctwa_clid": ctwa_clid
        });
    }
    serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": WABA_ID,
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
                    "contacts": [{"wa_id": phone, "profile": {"name": "Fault Test"}}],
                    "messages": [message]
                }
            }]
        }]
    }))
    .unwrap()
}

/// POSTs a signed webhook; the HTTP status, or the transport error.
pub async fn post_webhook(
    client: &reqwest::Client,
    base: &str,
    body: Vec<u8>,
) -> Result<u16, reqwest::Error> {
    let response = client
        .post(format!("{base}/webhooks/whatsapp"))
        .header("content-type", "application/json")
        .header("X-Hub-Signature-256", sign(&body))
        .body(body)
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// The conversion request for `phone`'s click on the account.
pub fn conversion(event_name: &str, event_id: &str, phone: &str) -> Value {
    json!({
        "accountId": ACCOUNT_ID,
        "eventName": event_name,
        "eventId": event_id,
        "phoneE164": phone,
    })
}

/// POSTs a conversion with the admin token; the HTTP status and JSON body (null when the body is
/// not JSON), or the transport error.
pub async fn post_conversion(
    client: &reqwest::Client,
    base: &str,
    request: &Value,
) -> Result<(u16, Value), reqwest::Error> {
    let response = client
        .post(format!("{base}/v1/whatsapp/conversions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(request)
        .send()
        .await?;
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// The account's conversations of `phone`, each with its `recentConversions`.
pub async fn conversations(
    client: &reqwest::Client,
    base: &str,
    phone: &str,
) -> Result<Vec<Value>, String> {
    let response = client
        .get(format!(
            "{base}/v1/whatsapp/attribution?phone={phone}&accountId={ACCOUNT_ID}"
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .map_err(|error| format!("lookup of {phone}: {error}"))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|error| format!("lookup of {phone}: {error}"))?;
    if status != 200 {
        return Err(format!("lookup of {phone}: HTTP {status}: {body}"));
    }
    Ok(body["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|result| result["accountId"] == ACCOUNT_ID)
        .flat_map(|result| {
            result["conversations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect())
}

/// The newest conversions of the account (`GET /v1/whatsapp/conversions`, at most 200).
pub async fn history(server: &RunningServer) -> Vec<Value> {
    let response = server
        .client
        .get(server.url(&format!(
            "/v1/whatsapp/conversions?accountId={ACCOUNT_ID}&limit=200"
        )))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("the server answers");
    assert_eq!(response.status(), 200, "history:\n{}", server.log_tail(50));
    let body: Value = response.json().await.unwrap();
    body["events"].as_array().cloned().unwrap_or_default()
}

/// The history item of one event id.
pub async fn history_item(server: &RunningServer, event_id: &str) -> Option<Value> {
    history(server)
        .await
        .into_iter()
        .find(|item| item["eventId"] == event_id)
}

pub async fn metrics(server: &RunningServer) -> String {
    server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("the server answers")
        .text()
        .await
        .unwrap()
}

/// The value of one sample line in Prometheus text, 0 when absent.
pub fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// The sum of every sample of a metric whose labels contain `label` (e.g. `status="unknown"`).
pub fn metric_sum(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Registers the account and captures one CTWA click from `phone`; returns the conversation id.
pub async fn account_with_click(server: &RunningServer, phone: &str, ctwa_clid: &str) -> String {
    register_account(server).await;
    let now = chrono::Utc::now().timestamp();
    let body = webhook_body(&format!("wamid.{phone}"), phone, now - 60, Some(ctwa_clid));
    let status = post_webhook(&server.client, &server.address, body)
        .await
        .expect("the server answers");
    assert_eq!(status, 200, "the click webhook:\n{}", server.log_tail(50));
    let conversations = conversations(&server.client, &server.address, phone)
        .await
        .unwrap();
    assert_eq!(conversations.len(), 1, "{conversations:#?}");
    conversations[0]["id"].as_str().unwrap().to_string()
}
