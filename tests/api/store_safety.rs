//! The real binary over a damaged, nearly full or failing store (SPEC §3): it never starts empty
//! over existing data, says what to do in one clean message, and still exits 0 on SIGTERM. On
//! sled, `/healthz` fails while the store is failed so a supervisor restarts it; redb recovers
//! in the process once the disk takes writes again, so `/healthz` stays 200 and `/readyz` fails.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{messages_webhook, sign, APP_SECRET, VERIFY_TOKEN};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary with test settings on `data_dir`; logs are captured, not shown.
fn relay(data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ctwa-relay"));
    command
        .arg("serve")
        .env_remove("CTWA_CONFIG")
        .env("CTWA_DATA_DIR", data_dir)
        .env("CTWA_STORE_ENGINE", crate::server::store_engine_name())
        .env("CTWA_LISTEN", "127.0.0.1:0")
        .env("CTWA_APP_SECRETS", APP_SECRET)
        .env("CTWA_VERIFY_TOKEN", VERIFY_TOKEN)
        .env("CTWA_GRAPH_URL", "http://127.0.0.1:9")
        .env("CTWA_WORKERS", "1")
        .env("CTWA_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        // A backtrace, if anything still printed one, would show up in the output.
        .env("RUST_BACKTRACE", "1");
    command
}

/// A child process whose stdout and stderr are collected line by line. Dropping it kills it.
struct Relay {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    fn spawn(mut command: Command) -> Relay {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), Arc::clone(&output));
        collect(child.stderr.take().unwrap(), Arc::clone(&output));
        Relay { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// The address from the "listening on http://…" line, once the server is up.
    async fn address(&mut self) -> String {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            let listening = self
                .output
                .lock()
                .unwrap()
                .iter()
                .find_map(|line| line.split("listening on http://").nth(1).map(str::to_owned));
            if let Some(address) = listening {
                return format!("http://{}", address.trim());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the server exited with {status:?}:\n{}", self.output());
            }
            assert!(
                Instant::now() < deadline,
                "the server did not start:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_for_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers take the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server is still running:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(stream: impl Read + Send + 'static, output: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            output.lock().unwrap().push(line);
        }
    });
}

/// Runs the binary once on `data_dir` so that it creates a store, and stops it.
async fn create_store(data_dir: &Path) {
    let mut relay = Relay::spawn(relay(data_dir));
    let address = relay.address().await;
    // Answering means the server runs, and so handles SIGTERM.
    let ready = reqwest::get(format!("{address}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    relay.terminate();
    let status = relay.wait_for_exit().await;
    assert!(status.success(), "{status:?}:\n{}", relay.output());
}

/// The binary must refuse to start: a non-zero exit, `expected` in its output, one clean error
/// and no panic or backtrace.
async fn assert_refused(command: Command, expected: &[&str]) -> String {
    let mut relay = Relay::spawn(command);
    let status = relay.wait_for_exit().await;
    let output = relay.output();
    assert_eq!(status.code(), Some(1), "{output}");
    for text in expected {
        assert!(output.contains(text), "{text:?} missing from:\n{output}");
    }
    assert!(!output.contains("listening on"), "{output}");
    assert!(!output.contains("panicked"), "{output}");
    assert!(!output.contains("backtrace"), "{output}");
    assert_eq!(output.matches("Error: ").count(), 1, "{output}");
    output
}

/// True when the suite runs on `engine` (`CTWA_TEST_STORE_ENGINE`); otherwise says why the test
/// is skipped.
fn runs_on(engine: &str, why: &str) -> bool {
    let running = crate::server::store_engine_name();
    if running != engine {
        eprintln!("skipped on {running}: {why}");
    }
    running == engine
}

#[tokio::test]
async fn a_store_whose_conf_was_cut_to_zero_bytes_is_refused_not_started_empty() {
    if !runs_on("sled", "it cuts sled's own `conf` file") {
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    create_store(data_dir.path()).await;
    // What a power cut did to sled's unsynced `conf` in the field.
    std::fs::write(data_dir.path().join("conf"), b"").unwrap();

    let shown = data_dir.path().display().to_string();
    assert_refused(
        relay(data_dir.path()),
        &[
            "cannot be opened safely",
            &shown,
            "conf (0 bytes)",
            "refuses to start rather than serve an empty or partial store",
            "Restore it from your latest backup",
            "move it aside",
        ],
    )
    .await;
    // The refused store was left as it was, for a restore or salvage.
    assert_eq!(
        std::fs::metadata(data_dir.path().join("conf"))
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test]
async fn a_store_that_sled_reads_as_empty_is_refused() {
    if !runs_on("sled", "it removes sled's own `db` file") {
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    create_store(data_dir.path()).await;
    // The log is gone but `conf` and the marker survived: sled would open an empty store.
    std::fs::remove_file(data_dir.path().join("db")).unwrap();

    assert_refused(
        relay(data_dir.path()),
        &[
            "the marker ctwa-store.json",
            "sled opens them as an empty store",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_redb_store_whose_database_was_lost_is_refused_not_started_empty() {
    if !runs_on("redb", "it removes redb's own `ctwa.redb` file") {
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    create_store(data_dir.path()).await;
    // The marker survived, the database did not: starting would serve an empty store.
    std::fs::remove_file(data_dir.path().join("ctwa.redb")).unwrap();

    let shown = data_dir.path().display().to_string();
    assert_refused(
        relay(data_dir.path()),
        &[
            "cannot be opened safely",
            &shown,
            "no ctwa.redb",
            "missing or empty",
            "refuses to start rather than serve an empty or partial store",
            "Restore it from your latest backup",
            "move it aside",
        ],
    )
    .await;
    assert!(!data_dir.path().join("ctwa.redb").exists());
}

#[tokio::test]
async fn a_directory_of_other_files_is_not_turned_into_a_store() {
    let data_dir = tempfile::tempdir().unwrap();
    std::fs::write(data_dir.path().join("notes.txt"), b"not a store").unwrap();

    assert_refused(
        relay(data_dir.path()),
        &["not a ctwa-relay store (notes.txt)", "CTWA_DATA_DIR"],
    )
    .await;
    assert!(!data_dir.path().join("db").exists());
}

/// The relay on `data_dir` with `CTWA_MIN_FREE_MB` at 1 TiB: more than any test machine has free.
fn relay_wanting_more_free_space_than_any_disk(data_dir: &Path) -> Command {
    let mut command = relay(data_dir);
    command.env("CTWA_MIN_FREE_MB", "1048576");
    command
}

#[tokio::test]
async fn too_little_free_space_is_refused_before_sled_writes_anything() {
    if !runs_on(
        "sled",
        "redb opens below CTWA_MIN_FREE_MB and fails readiness instead (the next test)",
    ) {
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    let command = relay_wanting_more_free_space_than_any_disk(data_dir.path());

    assert_refused(
        command,
        &[
            "MiB is free on the file system of",
            "CTWA_MIN_FREE_MB (1048576 MiB)",
            "free some space or grow the disk",
        ],
    )
    .await;
    assert!(!data_dir.path().join("db").exists());
}

/// redb opens a store without allocating space, so less free space than `CTWA_MIN_FREE_MB` does
/// not stop it: it starts with a warning, serves reads, stays alive, and `/readyz` says why it is
/// not ready.
#[tokio::test]
async fn too_little_free_space_opens_redb_and_fails_readiness_with_the_reason() {
    if !runs_on(
        "redb",
        "sled refuses to open below CTWA_MIN_FREE_MB (the test above)",
    ) {
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    create_store(data_dir.path()).await;
    let command = relay_wanting_more_free_space_than_any_disk(data_dir.path());
    let mut relay = Relay::spawn(command);
    let address = relay.address().await;
    let client = reqwest::Client::new();
    let healthz = get(&client, &address, "/healthz").await;
    assert_eq!(healthz.status(), 200);
    let readyz = get(&client, &address, "/readyz").await;
    assert_eq!(readyz.status(), 503);
    let body: Value = readyz.json().await.unwrap();
    assert_eq!(body["code"], "store_unavailable");
    let reason = body["error"].as_str().unwrap();
    assert!(
        reason.contains("less free space than CTWA_MIN_FREE_MB"),
        "{reason}"
    );
    // Writes go on while they fit: the disk is not full, only below the floor.
    let body = large_webhook(1, 1024);
    let webhook = client
        .post(format!("{address}/webhooks/whatsapp"))
        .header("Content-Type", "application/json")
        .header("X-Hub-Signature-256", sign(&body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(webhook.status(), 200);
    relay.terminate();
    let status = relay.wait_for_exit().await;
    let output = relay.output();
    assert!(status.success(), "{status:?}:\n{output}");
    for text in [
        "MiB is free on the file system of",
        "CTWA_MIN_FREE_MB (1048576 MiB)",
        "the store opens and serves reads",
        "free some space or grow the disk",
    ] {
        assert!(output.contains(text), "{text:?} missing from:\n{output}");
    }
    assert!(!output.contains("Error: "), "{output}");
}

/// A signed webhook of about `size` bytes for a number without an account: journaled and held.
/// A webhook of about `size` bytes whose text does not compress (the redb journal is stored
/// compressed), so that it fills the disk by its size.
fn large_webhook(index: usize, size: usize) -> Vec<u8> {
    let mut body = messages_webhook(&[(&format!("wamid.FULL-{index:04}"), "15550001111", 1, None)]);
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ index as u64;
    let text: String = (0..size)
        .map(|_| {
            // xorshift64: a different, incompressible text per webhook.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    body["entry"][0]["changes"][0]["value"]["messages"][0]["text"]["body"] = Value::String(text);
    serde_json::to_vec(&body).unwrap()
}

/// The binary under a file-size limit (`ulimit -f`, 512-byte blocks; `soft`: the soft limit only,
/// so that the test can lift it), with SIGXFSZ ignored so that writes past it fail with EFBIG as
/// on a full disk.
fn relay_with_file_size_limit(data_dir: &Path, blocks: u64, soft: bool) -> Command {
    let template = relay(data_dir);
    let mut command = Command::new("sh");
    let flag = if soft { "-S " } else { "" };
    command
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit {flag}-f {blocks} && exec \"$0\" serve"
        ))
        .arg(template.get_program());
    for (key, value) in template.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    command
}

async fn post_webhook(client: &reqwest::Client, address: &str, body: Vec<u8>) -> u16 {
    client
        .post(format!("{address}/webhooks/whatsapp"))
        .header("Content-Type", "application/json")
        .header("X-Hub-Signature-256", sign(&body))
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Webhooks of ~64 KiB until one is refused; returns the answers. Every one is answered 200
/// until one cannot be made durable.
async fn fill_until_refused(client: &reqwest::Client, address: &str) -> Vec<u16> {
    let mut answers = Vec::new();
    for index in 0..400 {
        let status = post_webhook(client, address, large_webhook(index, 64 * 1024)).await;
        answers.push(status);
        if status != 200 {
            break;
        }
    }
    assert_eq!(
        answers.last(),
        Some(&503),
        "the store never failed: {answers:?}"
    );
    answers
}

/// A full disk, made without root: the file-size limit stops sled's file growing.
#[tokio::test]
async fn a_failed_store_fails_healthz_and_sigterm_still_exits_0() {
    if !runs_on(
        "sled",
        "redb recovers without a restart, so its /healthz stays 200 (the next test)",
    ) {
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::spawn(relay_with_file_size_limit(data_dir.path(), 4096, false));
    let address = relay.address().await;
    let client = reqwest::Client::new();
    let healthz = get(&client, &address, "/healthz").await;
    assert_eq!(healthz.status(), 200);

    fill_until_refused(&client, &address).await;
    // Many more failures, then the log is checked for repetition.
    for index in 0..50 {
        let status = post_webhook(&client, &address, large_webhook(1000 + index, 1024)).await;
        assert_eq!(status, 503);
    }

    // sled keeps the error for good: the liveness probe fails, so a supervisor restarts it.
    for _ in 0..3 {
        let healthz = get(&client, &address, "/healthz").await;
        assert_eq!(healthz.status(), 503);
        let body: Value = healthz.json().await.unwrap();
        assert_eq!(body["code"], "store_failed");
        assert!(body["error"].as_str().unwrap().contains("restart"));
    }
    let ready = get(&client, &address, "/readyz").await;
    assert_eq!(ready.status(), 503);

    relay.terminate();
    let status = relay.wait_for_exit().await;
    let output = relay.output();
    assert!(
        status.success(),
        "SIGTERM exit status {status:?}:\n{output}"
    );
    assert!(
        output.contains("the final flush failed, but everything acknowledged was already durable"),
        "{output}"
    );
    assert!(!output.contains("panicked"), "{output}");
    assert!(!output.contains("backtrace"), "{output}");
    assert!(!output.contains("Error: "), "{output}");
    // 51 failed webhooks and 4 failed probes: each distinct failure is logged once per 10 s.
    let repeated = output.matches("store unavailable").count();
    assert!(
        (1..=3).contains(&repeated),
        "{repeated} store-unavailable lines:\n{output}"
    );
    assert!(
        output.matches("liveness check failed").count() <= 2,
        "{output}"
    );
    // The failed requests' own lines too: one per route and status per 10 s.
    let failed_requests = output.matches("request failed").count();
    assert!(
        (1..=4).contains(&failed_requests),
        "{failed_requests} request-failed lines:
{output}"
    );
}

/// The same full disk on redb: every write that cannot be made durable is refused (503, never a
/// false 200) and `/healthz` stays 200; once the limit is lifted, the writer has opened the
/// database again and webhooks are acknowledged without a restart; it opens again afterwards.
#[tokio::test]
async fn a_redb_store_that_cannot_grow_recovers_without_a_restart() {
    if !runs_on("redb", "sled keeps an I/O error for good (the test above)") {
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::spawn(relay_with_file_size_limit(data_dir.path(), 8192, true));
    let address = relay.address().await;
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{address}{path}")).send();

    fill_until_refused(&client, &address).await;
    for index in 0..50 {
        let status = post_webhook(&client, &address, large_webhook(1000 + index, 64 * 1024)).await;
        assert_eq!(status, 503, "webhook {index} after the limit");
    }
    for _ in 0..3 {
        let healthz = get("/healthz").await.unwrap();
        assert_eq!(healthz.status(), 200, "alive: it recovers by itself");
    }
    // `/readyz` is not checked here: its probe writes a few bytes, which fit in the pages redb
    // already has, and the file system is far above CTWA_MIN_FREE_MB (tests/disk fills a real
    // one and checks it).

    // Lift the limit: no restart.
    let pid = rustix::process::Pid::from_raw(relay.child.id() as i32).unwrap();
    rustix::process::prlimit(
        Some(pid),
        rustix::process::Resource::Fsize,
        rustix::process::Rlimit {
            current: None,
            maximum: None,
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut recovered = 0;
    let mut index = 2000;
    while recovered < 20 {
        assert!(
            Instant::now() < deadline,
            "webhooks were not acknowledged again within 10 s of the limit lifted:\n{}",
            relay.output()
        );
        index += 1;
        if post_webhook(&client, &address, large_webhook(index, 64 * 1024)).await == 200 {
            recovered += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);

    relay.terminate();
    let status = relay.wait_for_exit().await;
    let output = relay.output();
    assert!(
        status.success(),
        "SIGTERM exit status {status:?}:\n{output}"
    );
    assert!(!output.contains("panicked"), "{output}");
    assert!(!output.contains("Error: "), "{output}");
    assert!(
        output.contains("open again after a failed write"),
        "{output}"
    );
    assert!(output.contains("the store works again"), "{output}");
    // Repeated failures are rate-limited: 51 refused webhooks, each closing and reopening the
    // database, make a handful of lines.
    let closes = output.matches("refused a write; closing it").count();
    assert!((1..=3).contains(&closes), "{closes} close lines:\n{output}");

    // It opens again after the fault (tests/disk checks every acknowledged webhook is kept).
    drop(relay);
    let mut restarted = Relay::spawn(self::relay(data_dir.path()));
    let address = restarted.address().await;
    let ready = reqwest::get(format!("{address}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    restarted.terminate();
    assert!(restarted.wait_for_exit().await.success());
}

/// `CTWA_STORE_ENGINE=auto` (the default): a new data directory gets redb; a directory that
/// holds a sled store keeps being opened with sled, with its data.
#[tokio::test]
async fn the_default_engine_is_redb_for_a_new_directory_and_sled_for_a_sled_store() {
    use ctwa_relay::settings::StoreEngine;

    let mut new_dir = None;
    let app = crate::helpers::spawn_app_with(|settings| {
        settings.store_engine = StoreEngine::Auto;
        new_dir = Some(settings.data_dir.clone());
    })
    .await;
    app.register_account("acc_auto", crate::helpers::SAMPLE_PHONE_NUMBER_ID)
        .await;
    let marker = std::fs::read_to_string(new_dir.unwrap().join("ctwa-store.json")).unwrap();
    assert!(marker.contains("\"engine\":\"redb-"), "{marker}");

    let sled_dir = tempfile::tempdir().unwrap();
    drop(ctwa_relay::store::SledStore::open(sled_dir.path()).unwrap());
    // sled releases its file lock from a background thread after the drop.
    let mut opened = None;
    for _ in 0..100 {
        let path = sled_dir.path().to_path_buf();
        let graph = wiremock::MockServer::builder().start().await;
        let mut settings = crate::helpers::test_settings(&path, &graph.uri());
        settings.store_engine = StoreEngine::Auto;
        match ctwa_relay::startup::Application::build(settings).await {
            Ok(application) => {
                opened = Some(application);
                break;
            }
            Err(error) if format!("{error:#}").contains("lock") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("{error:#}"),
        }
    }
    let application = opened.expect("the sled store opens once sled releases its lock");
    drop(application);
    let marker = std::fs::read_to_string(sled_dir.path().join("ctwa-store.json")).unwrap();
    assert!(marker.contains("\"engine\":\"sled-"), "{marker}");
    assert!(!sled_dir.path().join("ctwa.redb").exists());
}

/// GET `path` on the relay at `address`.
async fn get(client: &reqwest::Client, address: &str, path: &str) -> reqwest::Response {
    client.get(format!("{address}{path}")).send().await.unwrap()
}
