//! Fault harness (issue 6): the RELEASE binary, black-box over loopback, against a fake Graph
//! API that misbehaves on demand; SIGKILL at random moments under webhook and conversion load.
//!
//! Every test is ignored so the plain `cargo test` lists them without running them. Run them
//! with `.ci/faults`, or:
//!
//! ```text
//! CTWA_FAULT_LEVEL=short cargo test --release --test faults -- --ignored --test-threads=1 --nocapture
//! ```
//!
//! `CTWA_FAULT_LEVEL=short` (the default, a couple of minutes) or `long` (at least 50 SIGKILL
//! cycles); `CTWA_FAULT_CYCLES` overrides the number of cycles and `CTWA_FAULT_SEED` replays a
//! load pattern. Each test prints a one-paragraph summary of what it tried and what was lost.

#[path = "../support/server.rs"]
mod server;

mod fake_graph;
mod graph_faults;
mod relay;
mod torture;

/// How long the harness runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Short,
    Long,
}

pub fn level() -> Level {
    match std::env::var("CTWA_FAULT_LEVEL").as_deref() {
        Err(_) | Ok("") | Ok("short") => Level::Short,
        Ok("long") => Level::Long,
        Ok(other) => panic!("CTWA_FAULT_LEVEL must be short or long, not {other:?}"),
    }
}

/// Prints a test's result paragraph, ready for RELIABILITY.md.
pub fn summary(title: &str, paragraph: &str) {
    let built = if cfg!(debug_assertions) {
        " (DEBUG build: run with --release for figures)"
    } else {
        ""
    };
    println!("\n=== fault summary: {title}{built} ===\n{paragraph}\n");
}
