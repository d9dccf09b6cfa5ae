//! `ctwa-bench --spawn` on the debug build with tiny sizes: every scenario runs against a real
//! server and reports zero errors. Correctness only: no figure it measures is asserted.

use std::process::Command;

use serde_json::Value;

/// Runs ctwa-bench with `args` plus `--spawn` and a JSON report, and returns the report.
fn bench(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_ctwa-bench"))
        .arg(format!("--spawn={}", env!("CARGO_BIN_EXE_ctwa-relay")))
        .arg("--json")
        .arg(&json)
        .arg("--tmp-dir")
        .arg(dir.path())
        .args(["--connections", "4", "--prebuild-mb", "8"])
        .args(args)
        .env_remove("CTWA_ADMIN_TOKEN")
        .env_remove("CTWA_BENCH_APP_SECRET")
        .output()
        .expect("ctwa-bench starts");
    assert!(
        output.status.success(),
        "ctwa-bench failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("| scenario |"),
        "the Markdown table is printed:\n{stdout}"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The spawned server's directory is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name != "report.json")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    report
}

fn scenario<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|scenario| scenario["scenario"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

fn assert_clean(report: &Value, name: &str) {
    let scenario = scenario(report, name);
    assert_eq!(scenario["errors"], 0, "{name} had errors: {scenario:#}");
    assert!(scenario["ok"].as_u64().unwrap() > 0, "{name}: {scenario:#}");
    assert!(
        scenario["latency"]["p50_ms"].as_f64().unwrap() > 0.0,
        "{name}: {scenario:#}"
    );
    assert!(
        scenario["ratio_to_ceiling"].as_f64().unwrap() > 0.0,
        "{name}: {scenario:#}"
    );
    assert!(
        scenario["server_peak_rss_bytes"].as_u64().unwrap() > 0,
        "{name}: {scenario:#}"
    );
}

#[test]
fn every_scenario_runs_against_a_spawned_server_without_errors() {
    let report = bench(&[
        "all",
        "--duration",
        "1s",
        "--conversations",
        "200",
        "--convert-phones",
        "20",
        // A loaded CI machine must not turn a slow answer of the stand-in into a queued
        // conversion (an error here): correctness only.
        "--server-env",
        "CTWA_GRAPH_TIMEOUT_MS=30000",
    ]);
    let names: Vec<_> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|scenario| scenario["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["ceiling", "ingest", "ingest-batch", "convert", "lookup"]
    );
    for name in names {
        assert_clean(&report, name);
    }
    // Each acknowledged message was processed, and each conversion reached the Graph stand-in.
    assert_eq!(
        report["messages_acknowledged"], report["server_messages_total"],
        "{report:#}"
    );
    let convert = scenario(&report, "convert");
    assert_eq!(convert["graph_events"], convert["ok"], "{convert:#}");
    assert_eq!(convert["graph_alone"]["errors"], 0, "{convert:#}");
    assert_eq!(
        scenario(&report, "ingest-batch")["messages_per_request"],
        100
    );
    let lookup = scenario(&report, "lookup");
    assert!(
        lookup["conversations_stored"].as_u64().unwrap() >= 200,
        "{lookup:#}"
    );
    let store = &report["store"];
    assert!(
        store["bytes_per_conversation"].as_f64().unwrap() > 0.0,
        "{report:#}"
    );
    assert_eq!(store["conversations"], report["messages_acknowledged"]);
    assert_eq!(report["server"]["exit_status"], "exit status: 0");
}

#[test]
fn a_fixed_rate_reports_latency_from_the_intended_start() {
    let report = bench(&[
        "ceiling,ingest,lookup",
        "--rate",
        "200",
        "--requests",
        "150",
        "--conversations",
        "300",
    ]);
    for name in ["ceiling", "ingest", "lookup"] {
        assert_clean(&report, name);
        let scenario = scenario(&report, name);
        assert_eq!(scenario["mode"], "rate");
        assert_eq!(scenario["ok"], 150, "{scenario:#}");
        assert!(scenario["send_lag"]["p99_ms"].is_number(), "{scenario:#}");
    }
    assert_eq!(
        report["messages_acknowledged"], report["server_messages_total"],
        "{report:#}"
    );
}
