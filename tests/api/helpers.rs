//! The test harness: the real application on a random port, a temporary store, and a wiremock
//! server standing in for Meta's Graph API. Nothing here reaches the internet.

use std::path::Path;
use std::sync::{Arc, Once};
use std::time::Duration;

use ctwa_relay::clock::{Clock, ManualClock};
use ctwa_relay::secret::Secret;
use ctwa_relay::settings::{Settings, StoreEngine};
use ctwa_relay::startup::Application;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tempfile::TempDir;
use wiremock::MockServer;

pub const APP_SECRET: &str = "test_app_secret";
pub const ROTATED_APP_SECRET: &str = "previous_app_secret";
pub const VERIFY_TOKEN: &str = "verify-me";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests";
pub const ACCESS_TOKEN: &str = "EAAG-test-access-token";

/// The business number and WABA of the samples in `fixtures/meta/`.
pub const SAMPLE_PHONE_NUMBER_ID: &str = "106540352242922";
pub const SAMPLE_WABA_ID: &str = "102290129340398";
pub const SAMPLE_ACCOUNT_ID: &str = "acc_sample";
pub const SAMPLE_DATASET_ID: &str = "987654321098765";
pub const SAMPLE_PHONE: &str = "16505551234";

static TRACING: Once = Once::new();

/// Logs stay quiet unless `TEST_LOG` is set.
fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            ctwa_relay::telemetry::init(ctwa_relay::settings::LogFormat::Text);
        }
    });
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub graph: MockServer,
    pub clock: ManualClock,
    /// The app's conversions service: tests run outbox passes with it instead of waiting.
    pub conversions: Arc<ctwa_relay::conversions::Service>,
    _temp: Option<TempDir>,
}

pub fn test_settings(data_dir: &Path, graph_url: &str) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().expect("a socket address"),
        data_dir: data_dir.to_path_buf(),
        app_secrets: vec![Secret::new(APP_SECRET), Secret::new(ROTATED_APP_SECRET)],
        verify_token: Some(Secret::new(VERIFY_TOKEN)),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        graph_url: graph_url.parse().expect("the mock server's URL"),
        workers: 1,
        // Generous, so a loaded machine does not turn a quick mock answer into a timeout.
        graph_timeout: Duration::from_secs(3),
        delivery_budget: Duration::from_secs(4),
        outbox_poll_interval: Duration::from_millis(50),
        outbox_backoff_base: Duration::from_millis(100),
        outbox_backoff_max: Duration::from_millis(400),
        store_engine: store_engine(),
        ..Settings::default()
    }
}

/// The engine the tests run the store on: `CTWA_TEST_STORE_ENGINE`, `redb` (the default, as
/// for a new data directory in production) or `sled`.
pub fn store_engine() -> StoreEngine {
    match std::env::var("CTWA_TEST_STORE_ENGINE").as_deref() {
        Err(_) | Ok("redb") => StoreEngine::Redb,
        Ok("sled") => StoreEngine::Sled,
        Ok(other) => panic!("CTWA_TEST_STORE_ENGINE={other}: expected sled or redb"),
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the app with test settings changed by `configure`.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    init_tracing();
    let temp = tempfile::tempdir().expect("a temporary directory");
    // Not from wiremock's pool: a pooled server can be handed to the next test while a
    // previous test's server still retries against it.
    let graph = MockServer::builder().start().await;
    let mut settings = test_settings(temp.path(), &graph.uri());
    configure(&mut settings);
    let (clock, handle) = Clock::adjustable();
    let application = Application::build_with_clock(settings, clock)
        .await
        .expect("the application builds");
    let address = format!("http://127.0.0.1:{}", application.port());
    let conversions = application.conversions();
    tokio::spawn(application.run_until_stopped());
    TestApp {
        address,
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        graph,
        clock: handle,
        conversions,
        _temp: Some(temp),
    }
}

pub fn sign_with(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn sign(body: &[u8]) -> String {
    sign_with(APP_SECRET, body)
}

/// A file under `fixtures/`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

pub fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

/// A webhook with one `messages` change for the sample number holding `messages`, each given
/// as (wamid, from, timestamp, optional referral).
pub fn messages_webhook(messages: &[(&str, &str, i64, Option<Value>)]) -> Value {
    let items: Vec<Value> = messages
        .iter()
        .map(|(id, from, timestamp, referral)| {
            let mut message = json!({
                "from": from,
                "id": id,
                "timestamp": timestamp.to_string(),
                "type": "text",
                "text": {"body": "hello"}
            });
            if let Some(referral) = referral {
                message["referral"] = referral.clone();
            }
            message
        })
        .collect();
    json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": SAMPLE_WABA_ID,
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550783881", "phone_number_id": SAMPLE_PHONE_NUMBER_ID},
                    "contacts": messages.iter().map(|(_, from, _, _)| json!({"wa_id": from, "profile": {"name": "Test User"}})).collect::<Vec<_>>(),
                    "messages": items
                }
            }]
        }]
    })
}

/// A CTWA referral; `ctwa_clid: None` is a Status-placement ad.
pub fn referral(ctwa_clid: Option<&str>, source_id: &str) -> Value {
    let mut referral = json!({
        "source_url": "https://fb.me/abc",
        "source_id": source_id,
        "source_type": "ad",
        "headline": "Chat with us",
        "body": "Summer sale",
        "media_type": "image",
        "image_url": "https://example.invalid/image.jpg",
        "welcome_message": {"text": "Hi!"}
    });
    if let Some(ctwa_clid) = ctwa_clid {
        referral["ctwa_clid"] = json!(ctwa_clid);
    }
    referral
}

/// An `automatic_events` webhook for the sample number.
pub fn automatic_event_webhook(
    message_id: &str,
    event_name: &str,
    ctwa_clid: Option<&str>,
    value: Option<i64>,
) -> Value {
    let mut event = json!({"id": message_id, "event_name": event_name, "timestamp": 1749069089});
    if let Some(ctwa_clid) = ctwa_clid {
        event["ctwa_clid"] = json!(ctwa_clid);
    }
    if let Some(value) = value {
        event["custom_data"] = json!({"currency": "USD", "value": value});
    }
    json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": SAMPLE_WABA_ID, "changes": [{
            "field": "automatic_events",
            "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550783881", "phone_number_id": SAMPLE_PHONE_NUMBER_ID},
                "automatic_events": [event]
            }
        }]}]
    })
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// POSTs a webhook body signed with the current app secret.
    pub async fn post_webhook(&self, body: &[u8]) -> reqwest::Response {
        self.post_webhook_signed(body, Some(&sign(body))).await
    }

    pub async fn post_webhook_json(&self, body: &Value) -> reqwest::Response {
        self.post_webhook(&serde_json::to_vec(body).unwrap()).await
    }

    pub async fn post_webhook_signed(
        &self,
        body: &[u8],
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url("/webhooks/whatsapp"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("X-Hub-Signature-256", signature);
        }
        request.send().await.expect("the server answers")
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the server answers")
    }

    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = self.client.request(method, self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the server answers")
    }

    pub async fn admin_post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.send_json(reqwest::Method::POST, path, Some(ADMIN_TOKEN), body)
            .await
    }

    /// Registers the account the Meta samples are addressed to, with a dataset.
    pub async fn register_sample_account(&self) -> Value {
        let response = self
            .admin_post(
                "/v1/admin/accounts",
                &json!({
                    "id": SAMPLE_ACCOUNT_ID,
                    "name": "Sample shop",
                    "phoneNumberId": SAMPLE_PHONE_NUMBER_ID,
                    "wabaId": SAMPLE_WABA_ID,
                    "displayPhoneNumber": "15550783881",
                    "accessToken": ACCESS_TOKEN,
                    "metadata": {"metaCapiDatasetId": SAMPLE_DATASET_ID}
                }),
            )
            .await;
        assert_eq!(response.status(), 201, "registering the sample account");
        response.json().await.unwrap()
    }

    /// Creates an API key scoped to `account_ids` and returns its secret.
    pub async fn create_key(&self, account_ids: &[&str]) -> String {
        let response = self
            .admin_post(
                "/v1/admin/api-keys",
                &json!({"name": "test key", "accountIds": account_ids}),
            )
            .await;
        assert_eq!(response.status(), 201, "creating an API key");
        let body: Value = response.json().await.unwrap();
        body["key"].as_str().unwrap().to_string()
    }

    /// `GET /v1/whatsapp/attribution?phone=…` with the admin token.
    pub async fn attribution(&self, phone: &str) -> Value {
        let response = self
            .get(
                &format!("/v1/whatsapp/attribution?phone={phone}"),
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// The conversations of `phone` on the sample account, newest first.
    pub async fn sample_conversations(&self, phone: &str) -> Vec<Value> {
        let body = self.attribution(phone).await;
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|result| result["accountId"] == SAMPLE_ACCOUNT_ID)
            .flat_map(|result| result["conversations"].as_array().unwrap().clone())
            .collect()
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics", None).await.text().await.unwrap()
    }

    /// One outbox pass, now, by the app's clock: what the background worker does on its next
    /// poll. Passes never overlap, so this and the worker never send the same record twice.
    pub async fn run_outbox_once(&self) {
        self.conversions
            .deliver_due(&tokio_util::sync::CancellationToken::new())
            .await
            .expect("the outbox pass succeeds");
    }

    /// The journal retention the worker runs once an hour, now, by the app's clock.
    pub async fn prune_journal_now(&self) {
        self.conversions
            .prune_journal(&tokio_util::sync::CancellationToken::new())
            .await;
    }
}

/// The value of an unlabelled or labelled sample line in Prometheus text.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The same webhook addressed to another business number: every change's
/// `value.metadata.phone_number_id` is replaced.
pub fn for_phone_number_id(mut webhook: Value, phone_number_id: &str) -> Value {
    for entry in webhook["entry"].as_array_mut().into_iter().flatten() {
        for change in entry["changes"].as_array_mut().into_iter().flatten() {
            change["value"]["metadata"]["phone_number_id"] = json!(phone_number_id);
        }
    }
    webhook
}

impl TestApp {
    /// Registers an account with the given id and business number (and a dataset).
    pub async fn register_account(&self, id: &str, phone_number_id: &str) -> Value {
        let response = self
            .admin_post(
                "/v1/admin/accounts",
                &json!({
                    "id": id,
                    "name": format!("Shop {id}"),
                    "phoneNumberId": phone_number_id,
                    "wabaId": SAMPLE_WABA_ID,
                    "accessToken": ACCESS_TOKEN,
                    "metadata": {"metaCapiDatasetId": SAMPLE_DATASET_ID}
                }),
            )
            .await;
        assert_eq!(response.status(), 201, "registering account {id}");
        response.json().await.unwrap()
    }

    /// `GET /v1/whatsapp/conversations/{id}` with the admin token.
    pub async fn conversation(&self, id: &str) -> Value {
        let response = self
            .get(
                &format!("/v1/whatsapp/conversations/{id}"),
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(response.status(), 200, "conversation {id}");
        response.json().await.unwrap()
    }
}
