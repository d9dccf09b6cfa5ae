//! The file system turns read-only under load: ext4 mounted `errors=remount-ro` raises an error
//! (`/sys/fs/ext4/<dev>/trigger_fs_error`, the path a real metadata error takes), so the kernel
//! aborts the journal and remounts read-only. While it is read-only no webhook may be answered
//! 200 and `/readyz` answers 503; then SIGTERM, `e2fsck -fy`, remount read-write, restart, and
//! every acknowledged webhook is looked up.

use std::time::Duration;

use tokio::time::Instant;

use crate::fs::describe_store;
use crate::load::{register_sample_account, server_env, status_of, Load};
use crate::reopen::{reopen, stop_gracefully, Tally, Verdict};
use crate::server::RunningServer;
use crate::{
    can_run, engine_keeps_every_acknowledged_write, image, print_summary, Level, Violations,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "disk fault harness: needs root and loop devices; run with .ci/disk"]
async fn read_only_file_system_mid_load() {
    const TEST: &str = "read_only_file_system_mid_load";
    if !can_run(TEST) {
        return;
    }
    let runs = Level::from_env().pick(1, 6);
    // The error comes after this many acknowledged webhooks: early (a store a fraction of a second
    // old) and later, after sled's background thread has fsynced its file a few times.
    let acks_before_error = [200, 2000, 6000];
    let env = server_env();
    let mut tally = Tally::default();
    let (mut acked, mut acked_verified, mut lost, mut false_acks, mut refused_ro) = (0, 0, 0, 0, 0);
    let mut readyz_seen = Vec::new();
    let mut exits = Vec::new();
    let started = Instant::now();
    let mut broken = Violations::default();
    for run in 1..=runs {
        let mut image = image(256, "errors=remount-ro");
        let data_dir = image.data_dir();
        let mut server = RunningServer::launch(&data_dir, &env).await;
        register_sample_account(&server).await;

        let load = Load::start(&server, 30);
        let wanted = acks_before_error[(run - 1) % acks_before_error.len()];
        load.wait_for_acks(wanted, Duration::from_secs(30)).await;
        image.trigger_error();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !image.is_read_only() {
            assert!(
                Instant::now() < deadline,
                "run {run}: the file system did not turn read-only after an ext4 error"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let read_only_at = Instant::now();
        // The load goes on against the read-only file system.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let readyz = status_of(&server, "/readyz").await;
        let healthz = status_of(&server, "/healthz").await;
        let report = load.stop().await;
        let (exit, _) = stop_gracefully(&mut server).await;
        let log_lines = server.log().lines().count();
        drop(server);
        image.unmount();
        let (fsck_code, _) = image.fsck();
        image.mount("");
        let files = describe_store(&data_dir);

        let clicks = report.clicks();
        let false_after = report.acked_sent_after(read_only_at);
        let reopened = reopen(&data_dir, &env, &[("acked", &clicks)]).await;
        println!(
            "run {run}/{runs}: {} acked before the file system turned read-only; {false_after} answered 200 for requests sent after it; \
             {} refused or unanswered ({}); while read-only /readyz {readyz}, /healthz {healthz}; SIGTERM: {exit}; {log_lines} log lines; \
             e2fsck -fy exit {fsck_code}; store after remount: {files}; restart: {}",
            report.acked.len(),
            report.refused_total(),
            report.refused_summary(),
            reopened.line()
        );
        tally.add(reopened.verdict);
        acked += clicks.len();
        if reopened.server.is_some() {
            acked_verified += reopened.checked();
            lost += reopened.lost();
        }
        false_acks += false_after;
        refused_ro += report.refused_total();
        readyz_seen.push(readyz);
        exits.push(exit);

        broken.check(false_after == 0, || {
            format!("run {run}: {false_after} webhooks answered 200 while the file system was read-only")
        });
        broken.check(readyz == 503, || {
            format!("run {run}: /readyz answered {readyz} while the file system was read-only")
        });
        broken.check(reopened.verdict != Verdict::Empty, || {
            format!(
                "run {run}: started empty over an existing store: {}",
                reopened.line()
            )
        });
        if engine_keeps_every_acknowledged_write() {
            broken.check(reopened.verdict == Verdict::Kept, || {
                format!("run {run}: {}", reopened.line())
            });
        }
        drop(reopened);
    }
    print_summary(
        TEST,
        &format!(
            "Read-only file system: ext4 (errors=remount-ro) over a loop device turned read-only by an ext4 error in the middle of a signed-webhook load from 12 tasks \
             (after {acks_before_error:?} acknowledged webhooks, in turn), {runs} run(s). While read-only: {false_acks} webhooks answered 200 for requests sent after it turned read-only, {refused_ro} refused or unanswered, \
             /readyz answered {readyz_seen:?}. SIGTERM afterwards: {}. After e2fsck -fy, a read-write remount and a restart: {}. \
             Acked webhooks: {acked}, of which {acked_verified} in stores that started again, {lost} of those lost. Took {:.0} s.",
            exits.join(", "),
            tally.sentence(),
            started.elapsed().as_secs_f64(),
        ),
    );
    broken.assert_none(TEST);
}
