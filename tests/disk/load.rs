//! The signed-webhook load: several tasks post one new CTWA click each per request and record
//! every one answered 200; afterwards a survey looks each acknowledged click up by phone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::helpers::{
    messages_webhook, referral, sign, ACCESS_TOKEN, ADMIN_TOKEN, APP_SECRET, SAMPLE_ACCOUNT_ID,
    SAMPLE_DATASET_ID, SAMPLE_PHONE_NUMBER_ID, SAMPLE_WABA_ID, VERIFY_TOKEN,
};
use crate::server::RunningServer;

/// Concurrent posting tasks.
const TASKS: usize = 12;

/// The environment every server of the harness runs with.
pub fn server_env() -> Vec<(&'static str, String)> {
    vec![
        ("CTWA_APP_SECRETS", APP_SECRET.to_string()),
        ("CTWA_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ("CTWA_VERIFY_TOKEN", VERIFY_TOKEN.to_string()),
        ("CTWA_GRAPH_URL", "http://127.0.0.1:9".to_string()),
    ]
}

pub async fn register_sample_account(server: &RunningServer) {
    server
        .create_account(
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

/// One CTWA click, in its own conversation: a phone of its own.
#[derive(Clone, Debug)]
pub struct Click {
    pub wamid: String,
    pub phone: String,
    pub ctwa_clid: String,
}

impl Click {
    /// `phase` (10..=99) keeps the phones of different load phases apart.
    fn new(phase: u8, task: usize, sequence: u64) -> Click {
        Click {
            wamid: format!("wamid.DISK-{phase}-{task}-{sequence}"),
            phone: format!("{phase}{task:02}{sequence:07}"),
            ctwa_clid: format!("CLID-DISK-{phase}-{task}-{sequence}"),
        }
    }

    fn body(&self) -> Vec<u8> {
        let webhook = messages_webhook(&[(
            self.wamid.as_str(),
            self.phone.as_str(),
            chrono::Utc::now().timestamp(),
            Some(referral(Some(&self.ctwa_clid), "ad-disk")),
        )]);
        serde_json::to_vec(&webhook).unwrap()
    }
}

/// Counters the scenario can watch while the load runs.
#[derive(Default)]
pub struct Progress {
    pub acked: AtomicU64,
    pub refused: AtomicU64,
}

/// One answered or failed request.
struct Outcome {
    click: Click,
    sent: Instant,
    /// The HTTP status, or `None` when the request got no answer.
    status: Option<u16>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    pub progress: Arc<Progress>,
    tasks: JoinSet<Vec<Outcome>>,
}

/// What a load phase saw.
pub struct LoadReport {
    /// Every click answered 200, with when its request was sent.
    pub acked: Vec<(Click, Instant)>,
    /// Answers other than 200, by status; `0` counts requests with no answer at all.
    pub refused: BTreeMap<u16, u64>,
}

impl LoadReport {
    pub fn clicks(&self) -> Vec<Click> {
        self.acked.iter().map(|(click, _)| click.clone()).collect()
    }

    /// Clicks answered 200 whose request was sent at or after `moment`.
    pub fn acked_sent_after(&self, moment: Instant) -> usize {
        self.acked
            .iter()
            .filter(|(_, sent)| *sent >= moment)
            .count()
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// "503×12, no answer×3".
    pub fn refused_summary(&self) -> String {
        if self.refused.is_empty() {
            return "none".into();
        }
        self.refused
            .iter()
            .map(|(status, count)| match status {
                0 => format!("no answer×{count}"),
                status => format!("{status}×{count}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Load {
    /// Starts posting to `server` until [`Load::stop`].
    pub fn start(server: &RunningServer, phase: u8) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let mut tasks = JoinSet::new();
        for task in 0..TASKS {
            let stop = stop.clone();
            let progress = progress.clone();
            let client = server.client.clone();
            let url = server.url("/webhooks/whatsapp");
            tasks.spawn(async move {
                let mut outcomes = Vec::new();
                let mut sequence = 0;
                while !stop.load(Ordering::Relaxed) {
                    let click = Click::new(phase, task, sequence);
                    sequence += 1;
                    let body = click.body();
                    let sent = Instant::now();
                    let status = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("X-Hub-Signature-256", sign(&body))
                        .timeout(Duration::from_secs(15))
                        .body(body)
                        .send()
                        .await
                        .map(|response| response.status().as_u16())
                        .ok();
                    if status == Some(200) {
                        progress.acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        progress.refused.fetch_add(1, Ordering::Relaxed);
                        // A refusing or dead server answers at once; do not spin on it.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    outcomes.push(Outcome {
                        click,
                        sent,
                        status,
                    });
                }
                outcomes
            });
        }
        Load {
            stop,
            progress,
            tasks,
        }
    }

    pub fn acked(&self) -> u64 {
        self.progress.acked.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> u64 {
        self.progress.refused.load(Ordering::Relaxed)
    }

    /// Waits until at least `count` webhooks were acknowledged (or `limit` passed).
    pub async fn wait_for_acks(&self, count: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.acked() < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until at least `count` more requests were refused than at the call (or `limit`).
    pub async fn wait_for_refusals(&self, count: u64, limit: Duration) -> bool {
        let start = self.refused();
        let deadline = Instant::now() + limit;
        while self.refused() < start + count {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Stops posting and collects what every task saw; requests in flight finish first.
    pub async fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = LoadReport {
            acked: Vec::new(),
            refused: BTreeMap::new(),
        };
        while let Some(outcomes) = self.tasks.join_next().await {
            for outcome in outcomes.expect("a load task") {
                match outcome.status {
                    Some(200) => report.acked.push((outcome.click, outcome.sent)),
                    other => *report.refused.entry(other.unwrap_or(0)).or_default() += 1,
                }
            }
        }
        report
    }
}

/// What a restarted server still knows of a set of acknowledged clicks.
#[derive(Default)]
pub struct Survey {
    pub checked: usize,
    /// Acknowledged clicks with no conversation carrying their click id.
    pub lost: usize,
    /// Lookups not answered 200 (the click's fate is unknown; counted as lost too).
    pub failed_lookups: usize,
    pub first_problem: Option<String>,
}

impl Survey {
    pub fn kept(&self) -> usize {
        self.checked - self.lost
    }
}

/// Looks up every click by phone and checks its conversation carries its click id.
pub async fn survey(server: &RunningServer, clicks: &[Click]) -> Survey {
    let mut lookups = JoinSet::new();
    let chunk = clicks.len().div_ceil(TASKS).max(1);
    for part in clicks.chunks(chunk) {
        let part = part.to_vec();
        let client = server.client.clone();
        let base = server.url("/v1/whatsapp/attribution");
        lookups.spawn(async move {
            let mut survey = Survey::default();
            for click in part {
                survey.checked += 1;
                let problem = match lookup(&client, &base, &click).await {
                    Ok(true) => continue,
                    Ok(false) => format!("{} (phone {}) is missing", click.wamid, click.phone),
                    Err(error) => {
                        survey.failed_lookups += 1;
                        format!("looking up {}: {error}", click.phone)
                    }
                };
                survey.lost += 1;
                survey.first_problem.get_or_insert(problem);
            }
            survey
        });
    }
    let mut total = Survey::default();
    while let Some(part) = lookups.join_next().await {
        let part = part.expect("a lookup task");
        total.checked += part.checked;
        total.lost += part.lost;
        total.failed_lookups += part.failed_lookups;
        if total.first_problem.is_none() {
            total.first_problem = part.first_problem;
        }
    }
    total
}

async fn lookup(client: &reqwest::Client, base: &str, click: &Click) -> Result<bool, String> {
    let response = client
        .get(base)
        .query(&[("phone", click.phone.as_str())])
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|error| error.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    let found = body["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|result| result["accountId"] == SAMPLE_ACCOUNT_ID)
        .flat_map(|result| {
            result["conversations"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .any(|conversation| {
            conversation["metadata"]["ctwa_clid"] == click.ctwa_clid.as_str()
                && conversation["metadata"]["ctwa_message_id"] == click.wamid.as_str()
        });
    Ok(found)
}

/// Whether the sample account is still registered.
pub async fn account_present(server: &RunningServer) -> Result<bool, String> {
    let response = server
        .client
        .get(server.url(&format!("/v1/admin/accounts/{SAMPLE_ACCOUNT_ID}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    match response.status().as_u16() {
        200 => Ok(true),
        404 => Ok(false),
        status => Err(format!("GET account answered {status}")),
    }
}

/// The status of a GET on `path` (`0` when there is no answer).
pub async fn status_of(server: &RunningServer, path: &str) -> u16 {
    server
        .client
        .get(server.url(path))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map(|response| response.status().as_u16())
        .unwrap_or(0)
}
