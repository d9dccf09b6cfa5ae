//! SIGKILL at random moments under webhook and conversion load while the Graph API changes
//! behaviour, restart on the same data directory, repeat; then check every acknowledged effect
//! and that Meta never took an event twice unless the record says it may have.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::fake_graph::{FakeGraph, Mode};
use crate::relay::{
    self, conversations, conversion, history_item, metric, post_conversion, post_webhook,
    webhook_body, DATASET_ID,
};
use crate::server::RunningServer;
use crate::{level, summary, Level};

const GRAPH_TIMEOUT_MS: u64 = 300;
const DELIVERY_BUDGET_MS: u64 = 600;
const UNKNOWN_RESEND_AFTER_MS: u64 = 1000;

fn settings() -> Vec<(&'static str, String)> {
    vec![
        ("CTWA_GRAPH_TIMEOUT_MS", GRAPH_TIMEOUT_MS.to_string()),
        ("CTWA_DELIVERY_BUDGET_MS", DELIVERY_BUDGET_MS.to_string()),
        ("CTWA_OUTBOX_POLL_INTERVAL_MS", "50".to_string()),
        ("CTWA_OUTBOX_BACKOFF_BASE_MS", "100".to_string()),
        ("CTWA_OUTBOX_BACKOFF_MAX_MS", "1000".to_string()),
        (
            "CTWA_UNKNOWN_RESEND_AFTER_MS",
            UNKNOWN_RESEND_AFTER_MS.to_string(),
        ),
    ]
}

const EVENT_NAMES: [&str; 5] = [
    "LeadSubmitted",
    "QualifiedLead",
    "AddToCart",
    "ViewContent",
    "InitiateCheckout",
];

/// Lookups show a conversation's 10 newest conversions; staying below keeps every record visible.
const CONVERSIONS_PER_PHONE: usize = 6;
const WEBHOOK_WORKERS: usize = 8;
const CONVERSION_WORKERS: usize = 4;
const LOOKUP_WORKERS: usize = 16;

struct Plan {
    cycles: usize,
    /// Random run time of a cycle before its SIGKILL, in milliseconds.
    kill_after_ms: std::ops::Range<u64>,
    /// The chance that a cycle's kill is instead the moment Meta accepts a conversion.
    kill_after_success: f64,
}

fn plan() -> Plan {
    let mut plan = match level() {
        Level::Short => Plan {
            cycles: 8,
            kill_after_ms: 500..2500,
            kill_after_success: 0.3,
        },
        Level::Long => Plan {
            cycles: 60,
            kill_after_ms: 400..3000,
            kill_after_success: 0.2,
        },
    };
    if let Ok(cycles) = std::env::var("CTWA_FAULT_CYCLES") {
        plan.cycles = cycles
            .parse()
            .expect("CTWA_FAULT_CYCLES must be a number of cycles");
    }
    plan
}

fn seed() -> u64 {
    match std::env::var("CTWA_FAULT_SEED") {
        Ok(seed) => seed.parse().expect("CTWA_FAULT_SEED must be a number"),
        Err(_) => rand::random(),
    }
}

struct Webhook {
    wamid: String,
    phone: String,
    ctwa_clid: Option<String>,
    acked: bool,
}

struct Conversion {
    event_name: &'static str,
    event_id: String,
    phone: String,
    requests: u32,
    /// Each request: the cycle, when it started and ended (ms since the start), what it got.
    log: Vec<String>,
    /// Answered 200 or 202 at least once.
    acked: bool,
    deduplicated: u32,
}

#[derive(Default)]
struct Ledger {
    webhooks: Vec<Webhook>,
    /// Phones whose click (with a `ctwa_clid`) was acknowledged: conversions can use them.
    clicked: Vec<String>,
    conversions_of_phone: HashMap<String, usize>,
    conversions: Vec<Conversion>,
    repeats: u64,
    /// Webhook answers other than 200, and transport errors, by kind.
    webhook_other: BTreeMap<String, u64>,
    /// Conversion answers by kind.
    conversion_answers: BTreeMap<String, u64>,
}

type SharedLedger = Arc<Mutex<Ledger>>;

async fn webhook_worker(
    ledger: SharedLedger,
    client: reqwest::Client,
    base: String,
    numbers: Arc<AtomicU64>,
    stop: CancellationToken,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let timestamp = chrono::Utc::now().timestamp() - 60;
    while !stop.is_cancelled() {
        let number = numbers.fetch_add(1, Ordering::Relaxed);
        let phone = format!("99{number:09}");
        let wamid = format!("wamid.TORTURE-{number}");
        let ctwa_clid = rng
            .gen_bool(0.4)
            .then(|| format!("CLID-TORTURE-{number}-Aff-n8ZTODiE79d22KtAwQKj9e"));
        let body = webhook_body(&wamid, &phone, timestamp, ctwa_clid.as_deref());
        let index = {
            let mut ledger = ledger.lock().unwrap();
            ledger.webhooks.push(Webhook {
                wamid,
                phone: phone.clone(),
                ctwa_clid: ctwa_clid.clone(),
                acked: false,
            });
            ledger.webhooks.len() - 1
        };
        let outcome = post_webhook(&client, &base, body).await;
        let failed = outcome.is_err();
        {
            let mut ledger = ledger.lock().unwrap();
            match outcome {
                Ok(200) => {
                    ledger.webhooks[index].acked = true;
                    if ctwa_clid.is_some() {
                        ledger.clicked.push(phone);
                    }
                }
                Ok(status) => {
                    *ledger
                        .webhook_other
                        .entry(format!("HTTP {status}"))
                        .or_default() += 1
                }
                Err(_) => *ledger.webhook_other.entry("no answer".into()).or_default() += 1,
            }
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A new conversion for a clicked phone, or (a quarter of the time) a repeat of an earlier one,
/// as a client retrying would send it.
fn next_conversion(ledger: &mut Ledger, rng: &mut StdRng) -> Option<usize> {
    if !ledger.conversions.is_empty() && rng.gen_bool(0.25) {
        ledger.repeats += 1;
        return Some(rng.gen_range(0..ledger.conversions.len()));
    }
    if ledger.clicked.is_empty() {
        return None;
    }
    // A few tries for a phone that still has room; recent clicks are as likely as old ones.
    for _ in 0..8 {
        let phone = ledger.clicked[rng.gen_range(0..ledger.clicked.len())].clone();
        let count = ledger
            .conversions_of_phone
            .entry(phone.clone())
            .or_default();
        if *count >= CONVERSIONS_PER_PHONE {
            continue;
        }
        *count += 1;
        let index = ledger.conversions.len();
        ledger.conversions.push(Conversion {
            event_name: EVENT_NAMES[rng.gen_range(0..EVENT_NAMES.len())],
            event_id: format!("ev-{index}"),
            phone,
            requests: 0,
            log: Vec::new(),
            acked: false,
            deduplicated: 0,
        });
        return Some(index);
    }
    None
}

async fn conversion_worker(
    ledger: SharedLedger,
    client: reqwest::Client,
    base: String,
    stop: CancellationToken,
    seed: u64,
    (cycle, start): (usize, Instant),
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.is_cancelled() {
        let request = {
            let mut ledger = ledger.lock().unwrap();
            next_conversion(&mut ledger, &mut rng).map(|index| {
                let conversion_ = &mut ledger.conversions[index];
                conversion_.requests += 1;
                (
                    index,
                    conversion(
                        conversion_.event_name,
                        &conversion_.event_id,
                        &conversion_.phone,
                    ),
                )
            })
        };
        let Some((index, request)) = request else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let sent_at = start.elapsed().as_millis();
        let outcome = post_conversion(&client, &base, &request).await;
        {
            let mut ledger = ledger.lock().unwrap();
            let kind = match &outcome {
                Ok((status @ (200 | 202), body)) => {
                    ledger.conversions[index].acked = true;
                    if body["deduplicated"] == true {
                        ledger.conversions[index].deduplicated += 1;
                    }
                    format!("{status} {}", body["status"].as_str().unwrap_or("?"))
                }
                Ok((status, body)) => format!("{status} {}", body["code"].as_str().unwrap_or("?")),
                Err(_) => "no answer".to_string(),
            };
            let entry = format!(
                "cycle {cycle} {sent_at}–{} ms: {kind}{}",
                start.elapsed().as_millis(),
                match &outcome {
                    Ok((_, body)) if body["deduplicated"] == true => " deduplicated",
                    _ => "",
                }
            );
            ledger.conversions[index].log.push(entry);
            *ledger.conversion_answers.entry(kind).or_default() += 1;
        }
        if outcome.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Changes the Graph API's behaviour every few hundred milliseconds; about half the time it works.
async fn weather(graph: Arc<FakeGraph>, stop: CancellationToken, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let slow = Mode::Slow(Duration::from_millis(GRAPH_TIMEOUT_MS + 400));
    let modes: [(Mode, u32); 9] = [
        (Mode::Ok, 45),
        (Mode::Down, 8),
        (slow, 8),
        (Mode::Reset, 8),
        (Mode::Truncated, 4),
        (Mode::NotJson, 4),
        (Mode::ZeroReceived, 5),
        (Mode::RateLimited, 9),
        (Mode::ServerError, 9),
    ];
    let total: u32 = modes.iter().map(|(_, weight)| weight).sum();
    while !stop.is_cancelled() {
        let mut pick = rng.gen_range(0..total);
        let mode = modes
            .iter()
            .find(|(_, weight)| {
                if pick < *weight {
                    return true;
                }
                pick -= weight;
                false
            })
            .map(|(mode, _)| *mode)
            .unwrap();
        graph.set_mode(mode);
        let pause = Duration::from_millis(rng.gen_range(150..600));
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Runs `check(client, base, item)` for every item on [`LOOKUP_WORKERS`] tasks, with one
/// keep-alive client; returns everything the checks returned.
async fn check_all<T, R, F, Fut>(base: &str, items: Vec<T>, check: F) -> Vec<R>
where
    T: Clone + Send + Sync + 'static,
    R: Send + 'static,
    F: Fn(reqwest::Client, Arc<str>, T) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = Vec<R>> + Send,
{
    let items = Arc::new(items);
    let base: Arc<str> = base.into();
    let next = Arc::new(AtomicU64::new(0));
    let client = relay::client();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..LOOKUP_WORKERS {
        let (items, next, client, base) =
            (items.clone(), next.clone(), client.clone(), base.clone());
        tasks.spawn(async move {
            let mut found = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(item) = items.get(index) else {
                    return found;
                };
                found.extend(check(client.clone(), base.clone(), item.clone()).await);
            }
        });
    }
    let mut found = Vec::new();
    while let Some(result) = tasks.join_next().await {
        found.extend(result.expect("a lookup task"));
    }
    found
}

/// The account's conversations of `phone`, retried a few times over a transport error.
async fn lookup(client: &reqwest::Client, base: &str, phone: &str) -> Result<Vec<Value>, String> {
    let mut last = String::new();
    for _ in 0..3 {
        match conversations(client, base, phone).await {
            Ok(found) => return Ok(found),
            Err(error) => last = error,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

#[derive(Clone)]
struct AckedWebhook {
    wamid: String,
    phone: String,
    ctwa_clid: Option<String>,
}

/// Why an acknowledged webhook is not stored as it should be, if it is not.
fn webhook_problem(webhook: &AckedWebhook, found: &[Value]) -> Option<String> {
    let AckedWebhook {
        wamid,
        phone,
        ctwa_clid,
    } = webhook;
    if found.is_empty() {
        return Some(format!("{wamid} (phone {phone}): no conversation"));
    }
    match ctwa_clid {
        Some(ctwa_clid) => {
            let attributed = found.iter().any(|conversation| {
                conversation["metadata"]["ctwa_clid"] == ctwa_clid.as_str()
                    && conversation["metadata"]["ctwa_message_id"] == wamid.as_str()
            });
            (!attributed).then(|| format!("{wamid} (phone {phone}): click {ctwa_clid} missing"))
        }
        None => found
            .iter()
            .all(|conversation| conversation["messageCount"].as_u64().unwrap_or(0) == 0)
            .then(|| format!("{wamid} (phone {phone}): the message is not counted")),
    }
}

/// Every conversion record of these phones, by event id, from the lookups' recent
/// conversions; and the lookups that failed.
async fn records_of(base: &str, phones: Vec<String>) -> (HashMap<String, Value>, Vec<String>) {
    let found = check_all(base, phones, |client, base, phone: String| async move {
        match lookup(&client, &base, &phone).await {
            Ok(conversations) => conversations
                .iter()
                .flat_map(|conversation| {
                    conversation["recentConversions"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .map(Ok)
                .collect(),
            Err(error) => vec![Err(error)],
        }
    })
    .await;
    let mut records = HashMap::new();
    let mut errors = Vec::new();
    for result in found {
        match result {
            Ok(item) => {
                let event_id = item["eventId"].as_str().unwrap_or_default().to_string();
                records.insert(event_id, item);
            }
            Err(error) => errors.push(error),
        }
    }
    (records, errors)
}

/// Waits until the restarted server's outbox is empty: no queued record among these phones'.
async fn drained(
    server: &RunningServer,
    phones: &[String],
    timeout: Duration,
) -> (HashMap<String, Value>, Vec<String>, Duration) {
    let started = Instant::now();
    // An interrupted attempt waits for its lease (budget + timeout + 1 s), then the guard interval.
    let floor = Duration::from_millis(
        DELIVERY_BUDGET_MS + GRAPH_TIMEOUT_MS + 1000 + UNKNOWN_RESEND_AFTER_MS,
    );
    loop {
        let depth = metric(&relay::metrics(server).await, "ctwa_outbox_depth");
        if depth == 0.0 && started.elapsed() >= floor {
            let (records, errors) = records_of(&server.address, phones.to_vec()).await;
            let queued = records
                .values()
                .filter(|record| record["status"] == "queued")
                .count();
            if queued == 0 || started.elapsed() > timeout {
                return (records, errors, started.elapsed());
            }
        }
        if started.elapsed() > timeout {
            let (records, errors) = records_of(&server.address, phones.to_vec()).await;
            return (records, errors, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn examples(problems: &[String]) -> String {
    let shown: Vec<&str> = problems.iter().take(10).map(String::as_str).collect();
    format!("{} (first ones: {})", problems.len(), shown.join("; "))
}

#[tokio::test]
#[ignore = "fault harness: run with .ci/faults (release build)"]
async fn sigkill_torture_loses_nothing_and_never_double_sends_unflagged() {
    let plan = plan();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let data_dir = tempfile::tempdir().unwrap();
    let graph = Arc::new(FakeGraph::start().await);
    let ledger: SharedLedger = Arc::default();
    let numbers = Arc::new(AtomicU64::new(0));
    let client = relay::client();
    let started = Instant::now();
    let mut kills_after_success = 0;
    let mut slowest_start = Duration::ZERO;

    let mut cycle_starts = Vec::new();
    for cycle in 0..plan.cycles {
        cycle_starts.push(started.elapsed());
        let starting = Instant::now();
        let mut server = relay::start(data_dir.path(), &graph, &settings()).await;
        slowest_start = slowest_start.max(starting.elapsed());
        if cycle == 0 {
            relay::register_account(&server).await;
        }
        graph.arm_kill(server.kill_switch());
        let stop = CancellationToken::new();
        let mut load = tokio::task::JoinSet::new();
        for worker in 0..WEBHOOK_WORKERS {
            load.spawn(webhook_worker(
                ledger.clone(),
                client.clone(),
                server.address.clone(),
                numbers.clone(),
                stop.clone(),
                seed ^ ((cycle as u64) << 16) ^ worker as u64,
            ));
        }
        for worker in 0..CONVERSION_WORKERS {
            load.spawn(conversion_worker(
                ledger.clone(),
                client.clone(),
                server.address.clone(),
                stop.clone(),
                seed ^ ((cycle as u64) << 16) ^ (100 + worker as u64),
                (cycle, started),
            ));
        }
        load.spawn(weather(
            graph.clone(),
            stop.clone(),
            seed ^ ((cycle as u64) << 16) ^ 200,
        ));
        let kills_before = graph.kills();
        if rng.gen_bool(plan.kill_after_success) {
            graph.then(Mode::KillAfterSuccess);
        }
        let run_for = Duration::from_millis(rng.gen_range(plan.kill_after_ms.clone()));
        tokio::select! {
            _ = tokio::time::sleep(run_for) => {}
            _ = graph.killed_after(kills_before) => kills_after_success += 1,
        }
        server.kill_hard().await;
        graph.disarm_kill();
        stop.cancel();
        while let Some(result) = load.join_next().await {
            result.expect("a load task");
        }
    }
    let load_time = started.elapsed();

    // Meta works again; the last process delivers what is left.
    cycle_starts.push(started.elapsed());
    graph.clear();
    graph.set_mode(Mode::Ok);
    let server = relay::start(data_dir.path(), &graph, &settings()).await;
    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .expect("the load tasks ended")
        .into_inner()
        .unwrap();
    let mut conversion_phones: Vec<String> = ledger
        .conversions
        .iter()
        .map(|conversion| conversion.phone.clone())
        .collect();
    conversion_phones.sort();
    conversion_phones.dedup();
    let (records, record_lookup_errors, drain_time) =
        drained(&server, &conversion_phones, Duration::from_secs(120)).await;

    let checking = Instant::now();
    let acked_webhooks: Vec<AckedWebhook> = ledger
        .webhooks
        .iter()
        .filter(|webhook| webhook.acked)
        .map(|webhook| AckedWebhook {
            wamid: webhook.wamid.clone(),
            phone: webhook.phone.clone(),
            ctwa_clid: webhook.ctwa_clid.clone(),
        })
        .collect();
    let acked_webhook_count = acked_webhooks.len();
    let lost_webhooks = check_all(
        &server.address,
        acked_webhooks,
        |client, base, webhook: AckedWebhook| async move {
            match lookup(&client, &base, &webhook.phone).await {
                Ok(found) => webhook_problem(&webhook, &found).into_iter().collect(),
                Err(error) => vec![format!("{} not checked: {error}", webhook.wamid)],
            }
        },
    )
    .await;
    let check_time = checking.elapsed();

    // What Meta received, by event id: every reception, and those it took.
    let received = graph.received();
    let mut taken: HashMap<(&str, &str), usize> = HashMap::new();
    let mut wrong_dataset = Vec::new();
    let mut by_mode: BTreeMap<String, usize> = BTreeMap::new();
    for reception in &received {
        let mode = match reception.mode {
            Mode::Slow(_) => "Slow".to_string(),
            mode => format!("{mode:?}"),
        };
        *by_mode.entry(mode).or_default() += 1;
        if reception.dataset != DATASET_ID {
            wrong_dataset.push(format!("{reception:?}"));
        }
        if reception.taken() {
            *taken
                .entry((reception.event_name.as_str(), reception.event_id.as_str()))
                .or_default() += 1;
        }
    }
    let mut lost_conversions = Vec::new();
    let mut stuck = Vec::new();
    let mut without_reason = Vec::new();
    let mut unflagged_duplicates = Vec::new();
    let mut more_than_twice = Vec::new();
    let mut sent_without_record = Vec::new();
    let mut sent_but_not_taken = Vec::new();
    let mut flagged = 0;
    let mut flagged_and_taken_twice = 0;
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    // What happened to one event, for the failure message: the client's requests, Meta's
    // receptions, and the record.
    let story = |conversion: &Conversion, record: &Value| {
        let receptions: Vec<String> = received
            .iter()
            .filter(|reception| reception.event_id == conversion.event_id)
            .map(|reception| {
                let at = reception.at.duration_since(started);
                let cycle = cycle_starts.partition_point(|start| *start <= at);
                format!(
                    "{:?} in cycle {} at {} ms",
                    reception.mode,
                    cycle as i64 - 1,
                    at.as_millis()
                )
            })
            .collect();
        format!(
            "{} {}: requests [{}]; Meta received [{}]; record {record}",
            conversion.event_name,
            conversion.event_id,
            conversion.log.join(", "),
            receptions.join(", ")
        )
    };
    for conversion in &ledger.conversions {
        let times_taken = taken
            .get(&(conversion.event_name, conversion.event_id.as_str()))
            .copied()
            .unwrap_or(0);
        let Some(record) = records.get(&conversion.event_id) else {
            if conversion.acked {
                lost_conversions.push(format!(
                    "{} (phone {})",
                    conversion.event_id, conversion.phone
                ));
            }
            if times_taken > 0 {
                sent_without_record.push(format!("{} taken {times_taken}×", conversion.event_id));
            }
            continue;
        };
        let status = record["status"].as_str().unwrap_or("?").to_string();
        *statuses.entry(status.clone()).or_default() += 1;
        let possible_duplicate = record["possibleDuplicate"] == true;
        flagged += usize::from(possible_duplicate);
        if status == "queued" {
            stuck.push(format!("{}: {record}", conversion.event_id));
        }
        if matches!(status.as_str(), "failed" | "unknown" | "expired") && record["error"].is_null()
        {
            without_reason.push(format!("{}: {record}", conversion.event_id));
        }
        if status == "sent" && times_taken == 0 {
            sent_but_not_taken.push(format!("{}: {record}", conversion.event_id));
        }
        if times_taken >= 2 && possible_duplicate {
            flagged_and_taken_twice += 1;
        }
        if times_taken >= 2 && !possible_duplicate {
            unflagged_duplicates.push(story(conversion, record));
        }
        if times_taken > 2 {
            more_than_twice.push(story(conversion, record));
        }
    }
    // The history endpoint agrees with the lookups on its newest 200 records.
    let history = relay::history(&server).await;
    let mut history_disagrees = Vec::new();
    for item in &history {
        let event_id = item["eventId"].as_str().unwrap_or_default();
        let agrees = records.get(event_id).is_some_and(|record| {
            record["status"] == item["status"]
                && record["possibleDuplicate"] == item["possibleDuplicate"]
        });
        if !agrees {
            history_disagrees.push(format!("{item} vs {:?}", records.get(event_id)));
        }
    }
    let acked_conversions = ledger.conversions.iter().filter(|c| c.acked).count();
    let repeats_deduplicated: u32 = ledger.conversions.iter().map(|c| c.deduplicated).sum();
    let webhooks_posted = ledger.webhooks.len();
    let taken_total: usize = taken.values().sum();

    summary(
        "SIGKILL torture",
        &format!(
            "{cycles} SIGKILL cycles in {load:.0} s of load (seed {seed}; each cycle ran {min}–{max} ms before its kill; {kills_after_success} of the kills landed just after Meta accepted a conversion and before ctwa-relay could store it; slowest restart {slowest} ms), {ww} webhook and {cw} conversion clients, the fake Graph API switching every 150–600 ms between ok (45 %), down, slower than the {timeout} ms timeout, connection reset, truncated 200, non-JSON 200, events_received 0, 429/80004 and 500. \
             Webhooks: {posted} posted, {acked_w} answered 200, {lost_w} lost (other answers: {other_w:?}). \
             Conversions: {unique} event ids, {requests} requests of which {repeats} repeats ({dedup} answered deduplicated); {acked_c} acknowledged (200/202), {lost_c} lost; answers {answers:?}. \
             After a last restart with Meta working, the outbox drained in {drain:.1} s (records checked included) and the acknowledged webhooks were looked up in {check:.1} s; final statuses {statuses:?}; {stuck} still queued, {no_reason} failed/unknown without a reason. \
             Meta received {receptions} events ({by_mode:?}) and took {taken_total}; events it took twice: {flagged_twice} flagged possibleDuplicate, {unflagged} unflagged (must be 0); taken more than twice: {more}; records flagged possibleDuplicate: {flagged}; unknown: {unknown}; taken without a durable record: {no_record}; 'sent' but never taken: {not_taken}.",
            cycles = plan.cycles,
            load = load_time.as_secs_f64(),
            min = plan.kill_after_ms.start,
            max = plan.kill_after_ms.end,
            slowest = slowest_start.as_millis(),
            ww = WEBHOOK_WORKERS,
            cw = CONVERSION_WORKERS,
            timeout = GRAPH_TIMEOUT_MS,
            posted = webhooks_posted,
            acked_w = acked_webhook_count,
            lost_w = lost_webhooks.len(),
            other_w = ledger.webhook_other,
            unique = ledger.conversions.len(),
            requests = ledger.conversions.iter().map(|c| u64::from(c.requests)).sum::<u64>(),
            repeats = ledger.repeats,
            dedup = repeats_deduplicated,
            acked_c = acked_conversions,
            lost_c = lost_conversions.len(),
            answers = ledger.conversion_answers,
            drain = drain_time.as_secs_f64(),
            check = check_time.as_secs_f64(),
            stuck = stuck.len(),
            no_reason = without_reason.len(),
            receptions = received.len(),
            by_mode = by_mode,
            flagged_twice = flagged_and_taken_twice,
            unflagged = unflagged_duplicates.len(),
            more = more_than_twice.len(),
            unknown = statuses.get("unknown").copied().unwrap_or(0),
            no_record = sent_without_record.len(),
            not_taken = sent_but_not_taken.len(),
        ),
    );

    let mut failures = Vec::new();
    for (what, problems) in [
        ("acknowledged webhooks lost", &lost_webhooks),
        ("acknowledged conversions lost", &lost_conversions),
        ("conversion lookups failed", &record_lookup_errors),
        ("conversions still queued after the drain", &stuck),
        (
            "failed/unknown conversions without a reason",
            &without_reason,
        ),
        (
            "events Meta took twice without possibleDuplicate",
            &unflagged_duplicates,
        ),
        ("events Meta took more than twice", &more_than_twice),
        (
            "events Meta took without a durable record",
            &sent_without_record,
        ),
        ("records 'sent' that Meta never took", &sent_but_not_taken),
        ("events sent to another dataset", &wrong_dataset),
        (
            "history items that disagree with the lookups",
            &history_disagrees,
        ),
    ] {
        if !problems.is_empty() {
            failures.push(format!("{what}: {}", examples(problems)));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nlast server log:\n{}",
        failures.join("\n"),
        server.log_tail(40)
    );
    assert!(
        acked_webhook_count > 0 && acked_conversions > 0,
        "the load did nothing"
    );
}

/// Meta accepted the conversion, then ctwa-relay was SIGKILLed before it read the answer: the
/// record was durable before the send, Meta gets it again at most once (flagged, after the guard
/// interval), and the client's retry is answered from the record.
#[tokio::test]
#[ignore = "fault harness: run with .ci/faults (release build)"]
async fn sigkill_after_meta_accepted_keeps_the_record_and_sends_at_most_once_more() {
    const PHONE: &str = "15557650002";
    let runs = match level() {
        Level::Short => 2,
        Level::Long => 8,
    };
    let mut results = Vec::new();
    let mut problems = Vec::new();
    for run in 0..runs {
        let data_dir = tempfile::tempdir().unwrap();
        let graph = FakeGraph::start().await;
        let event_id = format!("kill-after-success-{run}");
        let mut server = relay::start(data_dir.path(), &graph, &settings()).await;
        relay::account_with_click(
            &server,
            PHONE,
            "CLID-KILL-AFTER-SUCCESS-Aff-n8ZTODiE79d22KtAwQKj9e",
        )
        .await;
        graph.arm_kill(server.kill_switch());
        graph.then(Mode::KillAfterSuccess);
        let request = conversion("Purchase", &event_id, PHONE);
        let mut request = request;
        request["value"] = 12.5.into();
        request["currency"] = "EUR".into();
        let first = post_conversion(&server.client, &server.address, &request).await;
        server.wait_for_exit(Duration::from_secs(10)).await;
        assert_eq!(
            graph.kills(),
            1,
            "the fake did not kill the server: {first:?}"
        );

        let server = relay::start(data_dir.path(), &graph, &settings()).await;
        // The client saw no answer and retries at once.
        let retry = post_conversion(&server.client, &server.address, &request).await;
        let record_at_restart = history_item(&server, &event_id).await;
        // The lease of the interrupted attempt, the guard interval, the resend, and a margin in
        // which a third send would show.
        let settle =
            DELIVERY_BUDGET_MS + GRAPH_TIMEOUT_MS + 1000 + 3 * UNKNOWN_RESEND_AFTER_MS + 2000;
        tokio::time::sleep(Duration::from_millis(settle)).await;
        let record = history_item(&server, &event_id).await;
        let later_retry = post_conversion(&server.client, &server.address, &request).await;
        let received = graph.received_event(&event_id);
        let gap = (received.len() >= 2).then(|| received[1].at.duration_since(received[0].at));
        let status = |item: &Option<Value>| {
            item.as_ref()
                .map_or("none".to_string(), |item| item["status"].to_string())
        };
        let flagged = record
            .as_ref()
            .is_some_and(|item| item["possibleDuplicate"] == true);
        results.push(format!(
            "run {run}: first request {}; record at restart {}; retry at once answered {}; Meta received it {}×{}; final {} possibleDuplicate {flagged}; a later retry answered {}",
            match &first { Ok((status, _)) => format!("answered {status}"), Err(_) => "got no answer".into() },
            status(&record_at_restart),
            retry.as_ref().map_or("nothing".to_string(), |(status, body)| format!("{status} deduplicated {}", body["deduplicated"])),
            received.len(),
            gap.map_or(String::new(), |gap| format!(" (resend {} ms after)", gap.as_millis())),
            status(&record),
            later_retry.as_ref().map_or("nothing".to_string(), |(status, body)| format!("{status} deduplicated {}", body["deduplicated"])),
        ));
        if record_at_restart.is_none() {
            problems.push(format!("run {run}: no record after the restart"));
        }
        if received.len() > 2 || (received.len() == 2 && !flagged) {
            problems.push(format!(
                "run {run}: Meta received it {}× (flagged {flagged})",
                received.len()
            ));
        }
        if let Some(gap) = gap {
            if gap < Duration::from_millis(UNKNOWN_RESEND_AFTER_MS) {
                problems.push(format!(
                    "run {run}: resent {} ms after the first send, before the guard interval",
                    gap.as_millis()
                ));
            }
        }
        for (when, answer) in [("at once", &retry), ("later", &later_retry)] {
            match answer {
                Ok((200 | 202, body)) if body["deduplicated"] == true => {}
                other => problems.push(format!(
                    "run {run}: the retry {when} was not answered from the record: {other:?}"
                )),
            }
        }
        if !record
            .as_ref()
            .is_some_and(|item| matches!(item["status"].as_str(), Some("sent" | "unknown")))
        {
            problems.push(format!("run {run}: final record {record:?}"));
        }
    }
    summary(
        "SIGKILL after Meta accepted",
        &format!(
            "{runs} runs: ctwa-relay SIGKILLed the moment Meta took the conversion, before it read the answer; restarted on the same data (guard interval {UNKNOWN_RESEND_AFTER_MS} ms). {}. Problems: {}.",
            results.join("; "),
            if problems.is_empty() { "none".to_string() } else { problems.join("; ") }
        ),
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
