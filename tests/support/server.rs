//! The real `ctwa-relay` binary as a child process: started on a data directory with extra
//! environment, stopped with SIGKILL or SIGTERM, its log captured. Shared by the test targets
//! that include it with `#[path = "../support/server.rs"] mod server;`.

// Each test target uses its own subset of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

/// How long the server may take to print "listening on".
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped server may take to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(40);

/// A `ctwa-relay serve` child process. Dropping it kills the process, so a failing test never
/// leaves a server behind.
pub struct RunningServer {
    child: Arc<Mutex<Child>>,
    pid: u32,
    /// `http://127.0.0.1:port`, as the server printed it.
    pub address: String,
    /// One request per connection: keep-alive connections would hold a graceful shutdown open.
    pub client: reqwest::Client,
    output: Arc<Mutex<Vec<String>>>,
}

/// A server that did not start: how it ended (`None`: it hung and was killed) and its log.
pub struct LaunchFailure {
    pub status: Option<ExitStatus>,
    pub log: String,
}

/// Sends SIGKILL to one server from anywhere (another task, a fake Graph API), without owning
/// the [`RunningServer`]. Does nothing once the process has been waited for.
#[derive(Clone)]
pub struct KillSwitch {
    child: Arc<Mutex<Child>>,
}

impl KillSwitch {
    /// SIGKILL, at once: no shutdown code runs at all.
    pub fn kill(&self) {
        let _ = self.child.lock().unwrap().kill();
    }
}

/// Removes ANSI escape sequences (`ESC [ … letter`) from a log line.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for next in chars.by_ref() {
                    if next.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Copies every line of `stream` into `output` (and to `lines`, if given) until it closes. The
/// pipe is always drained, so the server never blocks on a full stdout.
fn drain_lines(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<Vec<String>>>,
    lines: Option<mpsc::UnboundedSender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            output.lock().unwrap().push(line.clone());
            if let Some(lines) = &lines {
                let _ = lines.send(line);
            }
        }
    });
}

/// The engine the server runs its store on: `CTWA_TEST_STORE_ENGINE` (`redb` by default, as for
/// a new data directory in production).
pub fn store_engine_name() -> String {
    std::env::var("CTWA_TEST_STORE_ENGINE").unwrap_or_else(|_| "redb".into())
}

impl RunningServer {
    /// Starts `ctwa-relay serve` on `data_dir`, listening on a random loopback port, with text
    /// logs at info and no config file; `env` is applied last, so it overrides these. Returns
    /// once the server printed "listening on"; panics with its log if it does not.
    pub async fn launch(data_dir: &Path, env: &[(&str, String)]) -> RunningServer {
        match RunningServer::try_launch(data_dir, env).await {
            Ok(server) => server,
            Err(LaunchFailure {
                status: Some(status),
                log,
            }) => {
                panic!("the server exited ({status}) before listening:\n{log}")
            }
            Err(LaunchFailure { status: None, log }) => {
                panic!("the server did not listen within {START_TIMEOUT:?}:\n{log}")
            }
        }
    }

    /// [`RunningServer::launch`], for a start that may fail: the exit status and log of a server
    /// that exited before listening, or (status `None`) of one killed after [`START_TIMEOUT`].
    pub async fn try_launch(
        data_dir: &Path,
        env: &[(&str, String)],
    ) -> Result<RunningServer, LaunchFailure> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ctwa-relay"));
        command
            .arg("serve")
            .env_remove("CTWA_CONFIG")
            .env("CTWA_LISTEN", "127.0.0.1:0")
            .env("CTWA_DATA_DIR", data_dir)
            .env("CTWA_STORE_ENGINE", store_engine_name())
            .env("CTWA_LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the ctwa-relay binary starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (sender, mut lines) = mpsc::unbounded_channel();
        drain_lines(child.stdout.take().unwrap(), output.clone(), Some(sender));
        drain_lines(child.stderr.take().unwrap(), output.clone(), None);
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut server = RunningServer {
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
            address: String::new(),
            client,
            output,
        };
        let found = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.recv().await {
                if let Some((_, rest)) = line.split_once("listening on http://") {
                    let address = rest.split_whitespace().next().unwrap_or_default();
                    return Some(format!("http://{address}"));
                }
            }
            None
        })
        .await;
        let status = match found {
            Ok(Some(address)) => {
                server.address = address;
                return Ok(server);
            }
            Ok(None) => Some(server.wait_for_exit(EXIT_TIMEOUT).await),
            Err(_) => {
                server.kill_hard().await;
                None
            }
        };
        // Let the stderr reader take the last lines.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Err(LaunchFailure {
            status,
            log: server.log(),
        })
    }

    /// Everything the process printed so far, stdout and stderr, without colours.
    /// Creates an account through the admin API and checks that the answer is 201.
    pub async fn create_account(&self, admin_token: &str, account: &serde_json::Value) {
        let response = self
            .client
            .post(self.url("/v1/admin/accounts"))
            .bearer_auth(admin_token)
            .json(account)
            .send()
            .await
            .expect("the server answers");
        assert_eq!(
            response.status(),
            201,
            "creating the account:\n{}",
            self.log_tail(50)
        );
    }

    pub fn log(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// The last `count` lines of the log.
    pub fn log_tail(&self, count: usize) -> String {
        let output = self.output.lock().unwrap();
        output[output.len().saturating_sub(count)..].join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle that SIGKILLs this process from elsewhere.
    pub fn kill_switch(&self) -> KillSwitch {
        KillSwitch {
            child: self.child.clone(),
        }
    }

    /// The exit status, if the process has ended.
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        self.child
            .lock()
            .unwrap()
            .try_wait()
            .expect("the child can be waited on")
    }

    /// Waits for the process to end on its own; panics with the log after `timeout`.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "the server did not exit within {timeout:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown code runs at all. Returns once the process is gone.
    pub async fn kill_hard(&mut self) {
        {
            let mut child = self.child.lock().unwrap();
            if child
                .try_wait()
                .expect("the child can be waited on")
                .is_none()
            {
                child.kill().expect("SIGKILL is delivered");
            }
        }
        self.wait_for_exit(EXIT_TIMEOUT).await;
    }

    /// SIGTERM: a graceful shutdown; does not wait for it.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
