//! The server under test: one the bench starts itself (`--spawn`) on a temporary data directory,
//! or one already running. Also what the bench reads about it: peak RSS from `/proc`, the size of
//! its data directory, and its counters from `/metrics`.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a spawned server may take to answer `/readyz` 200, and to exit after SIGTERM.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Spawned {
    child: Child,
    pub url: String,
    /// The temporary directory holding the data directory and the server's log.
    pub work_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    keep: bool,
}

/// The secrets a spawned server is given.
pub struct SpawnConfig<'a> {
    pub binary: &'a Path,
    pub graph_url: &'a str,
    pub admin_token: &'a str,
    pub app_secret: &'a str,
    /// `KEY=VALUE` pairs, applied last.
    pub extra_env: &'a [(String, String)],
    pub tmp_dir: &'a Path,
    pub keep: bool,
}

/// The `ctwa-relay` binary beside this one (both are built into the same target directory).
pub fn sibling_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the path of ctwa-bench itself")?;
    let sibling = me.with_file_name("ctwa-relay");
    if !sibling.exists() {
        bail!(
            "no ctwa-relay binary beside {}: build it (cargo build --release --bins) or pass its path: --spawn PATH",
            me.display()
        );
    }
    Ok(sibling)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Spawned {
    /// Starts `ctwa-relay serve` on a fresh data directory and a free port, and waits until its
    /// `/readyz` answers 200.
    pub async fn start(config: SpawnConfig<'_>) -> anyhow::Result<Spawned> {
        let unique = format!(
            "ctwa-bench-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let work_dir = config.tmp_dir.join(unique);
        let data_dir = work_dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let log_path = work_dir.join("server.log");
        // A port picked here could be taken before the server binds it: try a few.
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            let log = File::create(&log_path)?;
            let mut command = Command::new(config.binary);
            command
                .arg("serve")
                .env_remove("CTWA_CONFIG")
                .env_remove("CTWA_DATABASE_URL")
                .env("CTWA_LISTEN", format!("127.0.0.1:{port}"))
                .env("CTWA_DATA_DIR", &data_dir)
                .env("CTWA_APP_SECRETS", config.app_secret)
                .env("CTWA_ADMIN_TOKEN", config.admin_token)
                .env("CTWA_VERIFY_TOKEN", "bench-verify")
                .env("CTWA_GRAPH_URL", config.graph_url)
                .env("CTWA_GRAPH_VERSION", crate::payload::GRAPH_VERSION)
                .env("CTWA_LOG_FORMAT", "text")
                .env("NO_COLOR", "1")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            for (key, value) in config.extra_env {
                command.env(key, value);
            }
            let child = match command.spawn() {
                Ok(child) => child,
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&work_dir);
                    return Err(error)
                        .with_context(|| format!("cannot start {}", config.binary.display()));
                }
            };
            let mut spawned = Spawned {
                child,
                url: format!("http://127.0.0.1:{port}"),
                work_dir: work_dir.clone(),
                data_dir: data_dir.clone(),
                log_path: log_path.clone(),
                keep: config.keep,
            };
            match spawned.wait_ready().await {
                Ok(()) => return Ok(spawned),
                Err(error) => {
                    let in_use = log_tail(&log_path, 20).contains("in use");
                    spawned.kill();
                    if !in_use {
                        return Err(error);
                    }
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("three attempts failed"))
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "ctwa-relay exited ({status}) before it was ready; its log:\n{}",
                    log_tail(&self.log_path, 30)
                );
            }
            if let Ok(response) = client.get(format!("{}/readyz", self.url)).send().await {
                if response.status() == 200 {
                    return Ok(());
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "ctwa-relay did not answer /readyz 200 within {READY_TIMEOUT:?}; its log:\n{}",
                    log_tail(&self.log_path, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit (SIGKILL after a minute). Returns the exit status.
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32)
            .context("the server has no valid pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("cannot send SIGTERM to the server")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > EXIT_TIMEOUT {
                self.kill();
                bail!(
                    "ctwa-relay did not exit within {EXIT_TIMEOUT:?} of SIGTERM (killed); its log:\n{}",
                    log_tail(&self.log_path, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }
}

impl Drop for Spawned {
    /// Never leaves a server or its data behind (unless `--keep-data`).
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

/// Resident memory of a process, in bytes: (current `VmRSS`, peak `VmHWM`).
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let mut text = String::new();
    File::open(format!("/proc/{pid}/status"))
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time a process used so far (user + system), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: fields are counted after it.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state;
    // in USER_HZ, which Linux fixes at 100 for user space.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ticks * 10))
}

/// The size of a directory tree: (sum of file lengths, bytes allocated on disk).
pub fn dir_size(path: &Path) -> std::io::Result<(u64, u64)> {
    let mut apparent = 0;
    let mut allocated = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        if metadata.is_dir() {
            let (a, b) = dir_size(&entry.path())?;
            apparent += a;
            allocated += b;
        } else {
            apparent += metadata.len();
            allocated += metadata.blocks() * 512;
        }
    }
    Ok((apparent, allocated))
}

/// The value of an unlabelled counter in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}
