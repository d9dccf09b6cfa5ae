//! A full disk: a small ext4 file system filled (a big file beside the store, then the load
//! itself) while webhooks arrive; then the space is freed. And a restart on a nearly full disk
//! (32–64 KiB free), then the disk grown with `resize2fs`.
//!
//! On redb (the default; `CTWA_TEST_STORE_ENGINE=sled` for sled) the harness asserts more than on sled: the store
//! opens on the nearly full disk with every acknowledged webhook, serves lookups and stays alive
//! while writes fail, acknowledges nothing it did not make durable, and after the full disk it
//! takes webhooks again once space is freed, without a restart (`/healthz` and `/readyz` 200).

use std::time::Duration;

use tokio::time::Instant;

use crate::load::{register_sample_account, server_env, status_of, survey, Click, Load};
use crate::reopen::{reopen, stop_gracefully, Tally, Verdict};
use crate::server::RunningServer;
use crate::{
    can_run, engine_keeps_every_acknowledged_write, image, print_summary, Level, Violations,
};

const SMALL_MIB: u64 = 48;
/// Log lines that one full-disk episode of a few seconds may print from the fill to SIGTERM once
/// repeated errors and failed-request lines are rate-limited (issue 6 saw ~9 500 lines in all).
const MAX_LOG_LINES: usize = 300;
/// The line failed requests get (once per route and status per interval).
const ACCESS_LINE: &str = "request failed";
/// The line every request answered successfully gets: not counted against [`MAX_LOG_LINES`]
/// (a store that recovers serves many webhooks before SIGTERM, and the lookups while the disk
/// is full add theirs).
const SERVED_LINE: &str = "request served";

/// True when the harness runs on redb, which promises more here than sled (see the module doc).
fn on_redb() -> bool {
    crate::server::store_engine_name() == "redb"
}

/// Every acknowledged webhook must be there after the fault: redb keeps them; sled only once
/// `engine_keeps_every_acknowledged_write` says so.
fn keeps_every_acknowledged_write() -> bool {
    engine_keeps_every_acknowledged_write()
}

/// The environment for a small disk: the free-space check at start-up set below what a 48 MiB
/// file system has free.
fn small_disk_env(min_free_mb: &str) -> Vec<(&'static str, String)> {
    let mut env = server_env();
    env.push(("CTWA_MIN_FREE_MB", min_free_mb.to_string()));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "disk fault harness: needs root and loop devices; run with .ci/disk"]
async fn full_disk_during_webhook_load() {
    const TEST: &str = "full_disk_during_webhook_load";
    if !can_run(TEST) {
        return;
    }
    let runs = Level::from_env().pick(1, 3);
    let env = small_disk_env("1");
    let mut tally = Tally::default();
    let (mut recovered_runs, mut healthz_503_runs, mut clean_exits) = (0, 0, 0);
    let (mut acked_total, mut acked_verified, mut lost_total) = (0, 0, 0);
    let mut log_line_counts = Vec::new();
    let mut broken = Violations::default();
    let started = Instant::now();
    for run in 1..=runs {
        let image = image(SMALL_MIB, "");
        let data_dir = image.data_dir();
        let mut server = RunningServer::launch(&data_dir, &env).await;
        register_sample_account(&server).await;

        // A first batch of acknowledged clicks, looked up while the disk is full.
        let first = Load::start(&server, 39);
        first.wait_for_acks(100, Duration::from_secs(20)).await;
        let before: Vec<Click> = first.stop().await.clicks();
        let load = Load::start(&server, 40);
        load.wait_for_acks(100, Duration::from_secs(20)).await;
        let log_before = server.log().lines().count();
        let fillers = image.fill_leaving(256 << 10);
        let filled = load.wait_for_refusals(50, Duration::from_secs(60)).await;
        assert!(
            filled,
            "run {run}: the disk never filled: {} bytes free, {} acked",
            image.free_bytes(),
            load.acked()
        );
        let full_since = Instant::now();
        let acked_at_full = load.acked();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let healthz_full = status_of(&server, "/healthz").await;
        let readyz_full = status_of(&server, "/readyz").await;
        let reads_full = survey(&server, &before).await;

        for filler in &fillers {
            std::fs::remove_file(filler).unwrap();
        }
        let freed_at = Instant::now();
        let acked_at_free = load.acked();
        let free_after = image.free_bytes();
        // Recovered: new webhooks are acknowledged again without a restart.
        let mut recovered = false;
        let deadline = freed_at + Duration::from_secs(10);
        while Instant::now() < deadline {
            if load.acked() >= acked_at_free + 20 {
                recovered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let healthz_after = status_of(&server, "/healthz").await;
        let readyz_after = status_of(&server, "/readyz").await;
        let report = load.stop().await;
        let log = server.log();
        let all_fault_log: Vec<&str> = log.lines().skip(log_before).collect();
        let fault_log: Vec<&str> = all_fault_log
            .iter()
            .copied()
            .filter(|line| !line.contains(SERVED_LINE))
            .collect();
        let served_lines = all_fault_log.len() - fault_log.len();
        let fault_lines = fault_log.len();
        let access_lines = fault_log
            .iter()
            .filter(|line| line.contains(ACCESS_LINE))
            .count();
        let other_lines = fault_lines - access_lines;
        let repeated = crate::reopen::most_repeated(&fault_log, 3);
        let (exit, exited) = stop_gracefully(&mut server).await;
        let clean_exit = exited && exit == "exit status: 0";
        let log_lines = server.log().lines().count();
        let tail = crate::reopen::reason(&server.log_tail(5));
        drop(server);

        let clicks: Vec<Click> = report.clicks();
        let reopened = reopen(
            &data_dir,
            &env,
            &[("acked before the load", &before), ("acked", &clicks)],
        )
        .await;
        println!(
            "run {run}/{runs} ({}): {} acked, {} refused or unanswered ({}), of which {} acked during the {:.1} s full; \
             while full /healthz {healthz_full}, /readyz {readyz_full}, lookups of {} clicks acked before: {} found ({} failed); \
             space freed ({} KiB free): {} without a restart, \
             then /healthz {healthz_after}, /readyz {readyz_after}; SIGTERM: {exit}; {log_lines} log lines ({fault_lines} from the fill to SIGTERM besides {served_lines} of requests served: {access_lines} access lines of failed requests, {other_lines} others; most repeated: {repeated}; last: {tail}); restart: {}",
            crate::server::store_engine_name(),
            report.acked.len() + before.len(),
            report.refused_total(),
            report.refused_summary(),
            acked_at_free - acked_at_full,
            (freed_at - full_since).as_secs_f64(),
            reads_full.checked,
            reads_full.kept(),
            reads_full.failed_lookups,
            free_after >> 10,
            if recovered { "recovered" } else { "did not recover" },
            reopened.line()
        );
        tally.add(reopened.verdict);
        acked_total += clicks.len() + before.len();
        if reopened.server.is_some() {
            acked_verified += reopened.checked();
            lost_total += reopened.lost();
        }
        recovered_runs += usize::from(recovered);
        healthz_503_runs += usize::from(healthz_after == 503);
        clean_exits += usize::from(clean_exit);
        log_line_counts.push(format!("{log_lines} ({access_lines} access lines of failed requests, {other_lines} others during the fault)"));

        broken.check(recovered || healthz_after == 503, || {
            format!("run {run}: after the space was freed the server neither took webhooks again nor failed /healthz (so no supervisor restarts it)")
        });
        broken.check(clean_exit, || {
            format!("run {run}: SIGTERM after a full disk: {exit}")
        });
        broken.check(fault_lines <= MAX_LOG_LINES, || {
            format!("run {run}: {fault_lines} log lines from the fill to SIGTERM (besides requests served); repeated errors must be rate-limited")
        });
        broken.check(reopened.verdict != Verdict::Empty, || {
            format!("run {run}: {}", reopened.line())
        });
        if keeps_every_acknowledged_write() {
            broken.check(reopened.verdict == Verdict::Kept, || {
                format!("run {run}: {}", reopened.line())
            });
        }
        if on_redb() {
            broken.check(healthz_full == 200, || {
                format!("run {run}: redb recovers by itself, so /healthz must stay 200 while the disk is full; it answered {healthz_full}")
            });
            broken.check(readyz_full == 503, || {
                format!("run {run}: /readyz answered {readyz_full} while the disk was full")
            });
            broken.check(reads_full.kept() == reads_full.checked, || {
                format!(
                    "run {run}: lookups while the disk was full: {} of {} found ({} failed)",
                    reads_full.kept(),
                    reads_full.checked,
                    reads_full.failed_lookups
                )
            });
            broken.check(recovered && healthz_after == 200 && readyz_after == 200, || {
                format!("run {run}: after the space was freed redb must take webhooks again without a restart: {}, /healthz {healthz_after}, /readyz {readyz_after}", if recovered { "recovered" } else { "did not recover" })
            });
        }
        drop(reopened);
    }
    print_summary(
        TEST,
        &format!(
            "Full disk ({}): a {SMALL_MIB} MiB ext4 file system over a loop device, filled during a signed-webhook load from 12 tasks (a preallocated file beside the store, \
             then the load itself), full for ~3 s, then the space freed. {runs} run(s): recovered without a restart in {recovered_runs}; /healthz 503 after the space \
             was freed in {healthz_503_runs}; SIGTERM exited 0 in {clean_exits}; log lines per run: {}. Restart afterwards: {}. \
             Acked webhooks: {acked_total}, of which {acked_verified} in stores that started again, {lost_total} of those lost (a lost one would be a false 200). Took {:.0} s.",
            crate::server::store_engine_name(),
            log_line_counts.join("; "),
            tally.sentence(),
            started.elapsed().as_secs_f64(),
        ),
    );
    broken.assert_none(TEST);
}

/// How a restart on a nearly full disk went, and how the store fared after the disk grew.
struct NearlyFull {
    at_restart: Verdict,
    after_growth: Verdict,
}

/// One restart on a nearly full disk: after a clean stop, or (`crash`) after SIGKILL under load,
/// so that the store opens dirty (redb then needs its repair; quick repair, when the last commit
/// saved the allocator state, writes nothing new).
async fn nearly_full_once(
    run: usize,
    guard: bool,
    crash: bool,
    broken: &mut Violations,
) -> NearlyFull {
    let min_free = if guard { "1" } else { "0" };
    let env = small_disk_env(min_free);
    let mut image = image(SMALL_MIB, "");
    let data_dir = image.data_dir();
    let mut server = RunningServer::launch(&data_dir, &env).await;
    register_sample_account(&server).await;
    let load = Load::start(&server, 50);
    load.wait_for_acks(3000, Duration::from_secs(30)).await;
    let clicks = match crash {
        true => {
            server.kill_hard().await;
            load.stop().await.clicks()
        }
        false => {
            let clicks = load.stop().await.clicks();
            let (exit, exited) = stop_gracefully(&mut server).await;
            assert!(exited, "SIGTERM before the disk filled: {exit}");
            clicks
        }
    };
    drop(server);

    let _fillers = image.fill_leaving(48 << 10);
    let free = image.free_bytes();
    assert!(
        (16 << 10..=64 << 10).contains(&free),
        "run {run}: filling left {free} bytes free, not 32–64 KiB"
    );
    let at_restart = reopen(&data_dir, &env, &[("acked", &clicks)]).await;
    let at_restart_line = at_restart.line();
    let at_restart_verdict = at_restart.verdict;
    let at_restart_readyz = at_restart.readyz;
    // Writes on the nearly full disk: each is acknowledged only if it was made durable.
    let mut nearly_full_clicks = Vec::new();
    let mut nearly_full_line = String::new();
    let mut healthz_nearly_full = None;
    if let Some(mut server) = at_restart.server {
        let load = Load::start(&server, 51);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let report = load.stop().await;
        nearly_full_clicks = report.clicks();
        let healthz = status_of(&server, "/healthz").await;
        healthz_nearly_full = Some(healthz);
        nearly_full_line = format!(
            "; 3 s of webhooks on it: {} acked, {} refused ({}), /healthz {healthz} after",
            report.acked.len(),
            report.refused_total(),
            report.refused_summary()
        );
        stop_gracefully(&mut server).await;
    }

    image.grow(256, "");
    let after_growth = reopen(
        &data_dir,
        &env,
        &[
            ("acked", &clicks),
            ("acked on the nearly full disk", &nearly_full_clicks),
        ],
    )
    .await;
    let after_growth_readyz = after_growth.readyz;
    println!(
        "run {run} ({}, CTWA_MIN_FREE_MB={min_free}): {} acked, {}; restart with {} KiB free: {at_restart_line}{nearly_full_line}; after resize2fs to 256 MiB: {}",
        crate::server::store_engine_name(),
        clicks.len(),
        if crash { "SIGKILL under load" } else { "clean stop" },
        free >> 10,
        after_growth.line()
    );
    if on_redb() {
        broken.check(at_restart_verdict == Verdict::Kept, || {
            format!("run {run}: redb must open on a nearly full disk ({free} bytes free) with every acknowledged webhook: {at_restart_line}")
        });
        if guard {
            broken.check(at_restart_readyz == Some(503), || {
                format!("run {run}: /readyz must say 503 below CTWA_MIN_FREE_MB: {at_restart_line}")
            });
        }
        broken.check(healthz_nearly_full == Some(200), || {
            format!(
                "run {run}: /healthz on the nearly full disk after writes: {healthz_nearly_full:?}"
            )
        });
        broken.check(after_growth.verdict == Verdict::Kept, || {
            format!("run {run}: every webhook acknowledged, on the nearly full disk too, must be kept: {}", after_growth.line())
        });
        broken.check(after_growth_readyz == Some(200), || {
            format!(
                "run {run}: /readyz after the disk grew: {}",
                after_growth.line()
            )
        });
    } else if guard {
        broken.check(
            matches!(at_restart_verdict, Verdict::RefusedClearly | Verdict::Kept),
            || format!("run {run}: a restart with {free} bytes free must refuse clearly or keep everything: {at_restart_line}"),
        );
        broken.check(after_growth.verdict == Verdict::Kept, || {
            format!("run {run}: after a start on a nearly full disk, growing the disk must be enough: {}", after_growth.line())
        });
    } else if keeps_every_acknowledged_write() {
        broken.check(after_growth.verdict == Verdict::Kept, || {
            format!("run {run}: {}", after_growth.line())
        });
    }
    NearlyFull {
        at_restart: at_restart_verdict,
        after_growth: after_growth.verdict,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "disk fault harness: needs root and loop devices; run with .ci/disk"]
async fn nearly_full_disk_at_restart() {
    const TEST: &str = "nearly_full_disk_at_restart";
    if !can_run(TEST) {
        return;
    }
    let runs = Level::from_env().pick(1, 3);
    let started = Instant::now();
    let mut paragraphs = Vec::new();
    let mut broken = Violations::default();
    // sled only after a clean stop, as before; redb after SIGKILL too.
    let mut passes = vec![(true, false), (false, false)];
    if on_redb() {
        passes.push((true, true));
    }
    for (guard, crash) in passes {
        let (mut at_restart, mut after_growth) = (Tally::default(), Tally::default());
        for run in 1..=runs {
            let outcome = nearly_full_once(run, guard, crash, &mut broken).await;
            at_restart.add(outcome.at_restart);
            after_growth.add(outcome.after_growth);
        }
        paragraphs.push(format!(
            "{}: restart with 32–64 KiB free: {}; then the image grown to 256 MiB (resize2fs) and restarted: {}.",
            match (guard, crash, on_redb()) {
                (true, _, false) => "With the start-up free-space check (CTWA_MIN_FREE_MB=1)",
                (false, _, false) => "Without it (CTWA_MIN_FREE_MB=0, sled on its own)",
                (true, false, true) => "After a clean stop, with CTWA_MIN_FREE_MB=1 (redb: a warning and /readyz 503, no refusal)",
                (false, false, true) => "After a clean stop, with CTWA_MIN_FREE_MB=0",
                (_, true, true) => "After SIGKILL under load (the store opens dirty), with CTWA_MIN_FREE_MB=1",
            },
            at_restart.sentence(),
            after_growth.sentence()
        ));
    }
    print_summary(
        TEST,
        &format!(
            "Nearly full disk at restart ({}): a {SMALL_MIB} MiB ext4 file system over a loop device, a store written under load and stopped, then filled \
             to leave 32–64 KiB free; {runs} run(s) each way. {} Took {:.0} s.",
            crate::server::store_engine_name(),
            paragraphs.join(" "),
            started.elapsed().as_secs_f64()
        ),
    );
    broken.assert_none(TEST);
}
