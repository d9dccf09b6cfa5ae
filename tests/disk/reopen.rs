//! Restarting the server on a store that went through a fault, and judging what came back.

use std::path::Path;
use std::time::Duration;

use crate::load::{account_present, status_of, survey, Click, Survey};
use crate::server::{RunningServer, EXIT_TIMEOUT};

/// How a restart after a fault ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Started, with the account and every acknowledged webhook.
    Kept,
    /// Started, but some acknowledged webhooks (or the account) are gone.
    Lost,
    /// Started with nothing: no account and none of the acknowledged webhooks.
    Empty,
    /// Exited before listening, with a message and no uncaught panic.
    RefusedClearly,
    /// Exited before listening through an uncaught panic (exit status 101).
    Panicked,
    /// Neither listened nor exited within the start-up timeout.
    Hung,
}

impl Verdict {
    pub const ALL: [Verdict; 6] = [
        Verdict::Kept,
        Verdict::Lost,
        Verdict::Empty,
        Verdict::RefusedClearly,
        Verdict::Panicked,
        Verdict::Hung,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Verdict::Kept => "reopened with every acknowledged write",
            Verdict::Lost => "started but lost acknowledged writes",
            Verdict::Empty => "started empty",
            Verdict::RefusedClearly => "refused to start with a clear message",
            Verdict::Panicked => "would not open (uncaught panic at start-up)",
            Verdict::Hung => "hung at start-up",
        }
    }
}

/// A restart and what it found.
pub struct Reopened {
    pub verdict: Verdict,
    /// The restarted server, when it started.
    pub server: Option<RunningServer>,
    /// `/readyz` right after the start (when it started).
    pub readyz: Option<u16>,
    /// One survey per named group of acknowledged clicks.
    pub surveys: Vec<(&'static str, Survey)>,
    /// Why it refused, or what was lost.
    pub detail: String,
}

impl Reopened {
    pub fn lost(&self) -> usize {
        self.surveys.iter().map(|(_, survey)| survey.lost).sum()
    }

    pub fn checked(&self) -> usize {
        self.surveys.iter().map(|(_, survey)| survey.checked).sum()
    }

    /// One line for the per-run log.
    pub fn line(&self) -> String {
        let mut line = self.verdict.describe().to_string();
        if let Some(readyz) = self.readyz {
            line.push_str(&format!(", /readyz {readyz}"));
        }
        for (name, survey) in &self.surveys {
            line.push_str(&format!(
                "; {name}: {} of {} acked kept",
                survey.kept(),
                survey.checked
            ));
            if survey.failed_lookups > 0 {
                line.push_str(&format!(" ({} lookups failed)", survey.failed_lookups));
            }
        }
        if !self.detail.is_empty() {
            line.push_str(&format!(" — {}", self.detail));
        }
        line
    }
}

/// The lines of a start-up log that say why it stopped: errors and panics, else the last lines.
pub fn reason(log: &str) -> String {
    let telling: Vec<&str> = log
        .lines()
        .filter(|line| {
            line.contains("ERROR")
                || line.contains("panicked at")
                || line.starts_with("Error")
                || line.starts_with("error")
        })
        .collect();
    let lines: Vec<&str> = if telling.is_empty() {
        log.lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    } else {
        telling.into_iter().rev().take(3).rev().collect()
    };
    let joined = lines.join(" | ");
    if joined.chars().count() > 400 {
        format!("{}…", joined.chars().take(400).collect::<String>())
    } else {
        joined
    }
}

/// The most repeated lines among `lines` (timestamps and varying values stripped), with counts:
/// "6 800× ERROR webhook failed …".
pub fn most_repeated(lines: &[&str], top: usize) -> String {
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in lines {
        // Text logs start with an RFC 3339 timestamp; ids and numbers vary per line.
        let rest = line.split_once(' ').map_or(*line, |(first, rest)| {
            if first.contains('T') && first.ends_with('Z') {
                rest
            } else {
                line
            }
        });
        // Values that vary per line (ids, timings, statuses) become `…`.
        let shape: String = rest
            .split(' ')
            .map(|word| match word.split_once('=') {
                Some((key, value)) if value.chars().any(|c| c.is_ascii_digit()) => {
                    format!("{key}=…")
                }
                _ => word.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(160)
            .collect();
        *counts.entry(shape).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
        .into_iter()
        .take(top)
        .map(|(shape, count)| format!("{count}× {shape}"))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Starts the server on `data_dir` and, if it starts, looks up every click of each group.
pub async fn reopen(
    data_dir: &Path,
    env: &[(&str, String)],
    groups: &[(&'static str, &[Click])],
) -> Reopened {
    let server = match RunningServer::try_launch(data_dir, env).await {
        Ok(server) => server,
        Err(failure) => {
            let verdict = match failure.status {
                None => Verdict::Hung,
                Some(status) if status.code() == Some(101) => Verdict::Panicked,
                Some(_) => Verdict::RefusedClearly,
            };
            let status = failure
                .status
                .map(|status| status.to_string())
                .unwrap_or_else(|| "killed after the start-up timeout".into());
            return Reopened {
                verdict,
                server: None,
                readyz: None,
                surveys: Vec::new(),
                detail: format!("{status}: {}", reason(&failure.log)),
            };
        }
    };
    let readyz = status_of(&server, "/readyz").await;
    let account = account_present(&server).await;
    let mut surveys = Vec::new();
    for (name, clicks) in groups {
        surveys.push((*name, survey(&server, clicks).await));
    }
    let checked: usize = surveys.iter().map(|(_, survey)| survey.checked).sum();
    let lost: usize = surveys.iter().map(|(_, survey)| survey.lost).sum();
    let mut detail = String::new();
    let verdict = match account {
        Ok(false) if checked == lost => Verdict::Empty,
        Ok(true) if lost == 0 => Verdict::Kept,
        _ => Verdict::Lost,
    };
    match account {
        Ok(true) => {}
        Ok(false) => detail.push_str("the account is gone"),
        Err(error) => detail.push_str(&format!("reading the account: {error}")),
    }
    if let Some(problem) = surveys
        .iter()
        .find_map(|(_, survey)| survey.first_problem.clone())
    {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str(&format!("first loss: {problem}"));
    }
    Reopened {
        verdict,
        server: Some(server),
        readyz: Some(readyz),
        surveys,
        detail,
    }
}

/// SIGTERM, then waits; SIGKILL if it takes longer than the exit timeout. Returns the exit
/// status as text ("exit status: 0") and whether the process ended on its own.
pub async fn stop_gracefully(server: &mut RunningServer) -> (String, bool) {
    server.terminate();
    let deadline = tokio::time::Instant::now() + EXIT_TIMEOUT;
    loop {
        if let Some(status) = server.try_exit_status() {
            return (status.to_string(), true);
        }
        if tokio::time::Instant::now() > deadline {
            server.kill_hard().await;
            return (
                format!("no exit within {EXIT_TIMEOUT:?} of SIGTERM; killed"),
                false,
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts of verdicts, for the summaries.
#[derive(Default)]
pub struct Tally {
    counts: std::collections::BTreeMap<Verdict, usize>,
}

impl Tally {
    pub fn add(&mut self, verdict: Verdict) {
        *self.counts.entry(verdict).or_default() += 1;
    }

    pub fn get(&self, verdict: Verdict) -> usize {
        self.counts.get(&verdict).copied().unwrap_or(0)
    }

    /// "12 of 20 reopened with every acknowledged write, 8 refused to start with a clear message":
    /// every verdict seen, none of the others.
    pub fn sentence(&self) -> String {
        let total: usize = self.counts.values().sum();
        let parts: Vec<String> = Verdict::ALL
            .iter()
            .filter(|verdict| self.get(**verdict) > 0)
            .map(|verdict| format!("{} {}", self.get(*verdict), verdict.describe()))
            .collect();
        if parts.is_empty() {
            return "none".into();
        }
        format!("of {total}: {}", parts.join(", "))
    }
}
