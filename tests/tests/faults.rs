//! End-to-end faults around the commit protocol's decision point, between
//! two network-namespace hosts. Each test checks the invariant: the
//! container runs exactly once (never on both hosts, never on neither
//! unless the exit code says lost), its counter never jumps back, nothing is
//! left behind, and what `migrate` says matches where the container runs.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use migrate_e2e::checks::{
    assert_destination_discarded, assert_no_images, assert_running_on_source_unchanged,
    assert_work_dir_clean, counter, heap, stderr, wait_for_heap, wait_for_ticks,
    wait_until_mid_transfer, GAME,
};
use migrate_e2e::resources::fault_injection_migrate;
use migrate_e2e::{
    runc_exec, sh, wait_until, Destination, Lab, SourceContainer, DST_ADDR, DST_PORT,
};

/// The phase in the destination's record of `id` ("receiving" once it
/// restores, "held", "released"), if it has one.
fn destination_phase(dst: &Destination, id: &str) -> Option<String> {
    let text = std::fs::read(dst.container_dir(id).join("migration.json")).ok()?;
    let record: serde_json::Value = serde_json::from_slice(&text).ok()?;
    record["phase"].as_str().map(str::to_owned)
}

/// Polls fast: the moments these tests aim at last milliseconds.
fn wait_for_destination_phase(dst: &Destination, id: &str, phase: &str, migrate: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while destination_phase(dst, id).as_deref() != Some(phase) {
        if let Some(status) = migrate.try_wait().unwrap() {
            panic!("migrate ended ({status}) before the destination was {phase}");
        }
        assert!(
            Instant::now() < deadline,
            "the destination never was {phase}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn spawn_migrate(lab: &Lab, container: &SourceContainer, extra: &[&str]) -> Child {
    lab.migrate_command(container, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON from migrate ({e}):\n{}", stderr(out)))
}

/// The destination's copy, if it has one: (token, count) from its rootfs.
fn destination_counter(dst: &Destination, id: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(dst.container_dir(id).join("rootfs/work/counter")).ok()?;
    let (token, count) = text.trim().split_once(' ')?;
    Some((token.to_owned(), count.parse().ok()?))
}

/// The destination holds a copy that does not run: its counter stands still.
fn assert_held_not_running(dst: &Destination, id: &str) {
    let first = destination_counter(dst, id).expect("the destination holds no copy");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        destination_counter(dst, id),
        Some(first),
        "the destination's copy runs"
    );
}

/// The container runs on the destination (its counter moves on from where
/// the source left it) and is gone from the source.
fn assert_runs_on_destination_only(
    dst: &Destination,
    container: &SourceContainer,
    before: &(String, u64),
) {
    assert!(
        container.state().is_none(),
        "still registered on the source"
    );
    let first = counter(|args| runc_exec(&dst.runc_root, &container.id, args));
    assert_eq!(first.0, before.0, "another container runs there");
    assert!(
        first.1 >= before.1,
        "the counter went back: {first:?} after {before:?}"
    );
    wait_until("the copy to count on", Duration::from_secs(10), || {
        counter(|args| runc_exec(&dst.runc_root, &container.id, args)).1 > first.1
    });
}

/// `migrate-dst status` on the destination host.
fn destination_status(lab: &Lab, dst: &Destination) -> serde_json::Value {
    let out = lab
        .hosts
        .on(&lab.hosts.dst, &migrate_e2e::bin("migrate-dst"))
        .arg("status")
        .arg("--state-dir")
        .arg(&dst.state_dir)
        .args(["--in-doubt-after", "0", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "status: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["version"], 1, "{report}");
    report["containers"].clone()
}

fn resolve(
    lab: &Lab,
    container: &SourceContainer,
    extra: &[&str],
) -> (Option<i32>, serde_json::Value) {
    let out = lab.resolve_command(container, extra).output().unwrap();
    let said = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    let resolution: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON from migrate resolve ({e}):\n{said}"));
    assert_eq!(resolution["version"], 1, "{resolution}");
    (out.status.code(), resolution)
}

fn assert_no_record(lab: &Lab, id: &str) {
    assert_eq!(lab.source_phase(id), None, "the source keeps a record");
}

#[test]
fn release_lost_after_the_decision_is_in_doubt_until_resolve_releases() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("f1", GAME);
    let before = wait_for_ticks(&container, 3);

    // The source holds its Release back for 2 s after its decision, so
    // that the cut below comes before it, however slowly this test runs.
    let mut child = lab
        .migrate_command_of(
            &fault_injection_migrate(),
            &container,
            &["--link-timeout", "3", "--resume-timeout", "5"],
        )
        .env("MIGRATE_FAULT_RELEASE_DELAY_MS", "2000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_destination_phase(&dst, "f1", "held", &mut child);
    // The destination's Restored still reaches the source, which decides;
    // its Release does not arrive.
    let cut = lab.hosts.cut_link_to_destination();
    let out = child.wait_with_output().unwrap();
    let report = json(&out);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "not in doubt:\n{err}");
    assert_eq!(report["runs_on"], "held, in doubt: see migrate resolve");
    assert!(err.contains("migrate resolve f1"), "{err}");
    assert_eq!(lab.source_phase("f1").as_deref(), Some("decided"));
    assert!(
        container.state().is_none_or(|s| s["status"] != "running"),
        "the source copy runs after the decision"
    );
    assert_held_not_running(&dst, "f1");
    let status = destination_status(&lab, &dst);
    assert_eq!(status[0]["container"], "f1", "{status}");
    assert_eq!(status[0]["phase"], "held", "{status}");
    assert_eq!(status[0]["in_doubt"], true, "{status}");

    // The link is back: resolve releases the held copy and commits.
    drop(cut);
    let (code, resolution) = resolve(&lab, &container, &[]);
    assert_eq!(code, Some(0), "{resolution}");
    assert_eq!(resolution["runs_on"], "destination", "{resolution}");
    assert_runs_on_destination_only(&dst, &container, &before);
    assert_no_record(&lab, "f1");
    wait_until(
        "the destination to drop its record",
        Duration::from_secs(10),
        || destination_phase(&dst, "f1").is_none(),
    );
    assert_work_dir_clean(&lab);
}

#[test]
fn killing_migrate_right_after_its_decision_leaves_resolve_to_release() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("f2", &format!("{}{GAME}", heap("384M", "0")));
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    let mut child = spawn_migrate(&lab, &container, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while lab.source_phase("f2").as_deref() != Some("decided") {
        assert!(child.try_wait().unwrap().is_none(), "migrate ended first");
        assert!(Instant::now() < deadline, "migrate never decided");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // The decision stands without its migrate: CRIU's hook reads it from the
    // record and ends the source copy instead of resuming it.
    wait_until("the source copy to end", Duration::from_secs(20), || {
        container
            .state()
            .is_none_or(|s| s["status"] != "running" && s["status"] != "paused")
    });
    let (code, resolution) = resolve(&lab, &container, &[]);
    assert_eq!(code, Some(0), "{resolution}");
    assert_eq!(resolution["runs_on"], "destination", "{resolution}");
    assert_runs_on_destination_only(&dst, &container, &before);
    assert_no_record(&lab, "f2");
}

#[test]
fn a_destination_killed_while_holding_its_copy_and_restarted_ends_in_one_copy() {
    let lab = Lab::new();
    let mut dst = lab.start_destination(&[]);
    let container = lab.start_container("f3", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let mut child = spawn_migrate(&lab, &container, &[]);
    wait_for_destination_phase(&dst, "f3", "held", &mut child);
    dst.kill();
    // The held copy waits for the next run of the daemon, which adopts it
    // and hears from the source (reconnecting) what to do with it.
    let dst = lab.start_destination(&[]);
    let out = child.wait_with_output().unwrap();
    let report = json(&out);
    match out.status.code() {
        // The source had not read Restored: it went back, and its Abort
        // reached the restarted destination, which discarded the copy.
        Some(1) => {
            assert_eq!(report["runs_on"], "source", "{report}");
            assert_running_on_source_unchanged(&container, pid, &before);
            assert_destination_discarded(&dst, "f3");
        }
        // It had: the restarted destination took the Release.
        Some(0) => assert_runs_on_destination_only(&dst, &container, &before),
        other => panic!("exit {other:?}:\n{}", stderr(&out)),
    }
    // Either way the adopted copy's images went with the migration's end.
    assert_no_images(&dst, "f3");
    assert!(
        dst.log_text().contains("f3"),
        "the restarted destination never heard of f3"
    );
    assert_no_record(&lab, "f3");
    assert_work_dir_clean(&lab);
}

#[test]
fn sigterm_mid_transfer_resumes_the_container_like_ctrl_c_and_a_second_signal_changes_nothing() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("f4", &format!("{}{GAME}", heap("384M", "0")));
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let mut child = spawn_migrate(&lab, &container, &[]);
    wait_until_mid_transfer(&dst, "f4", &mut child);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // A second signal while it cleans up does not cut the cleanup short.
    std::thread::sleep(Duration::from_millis(100));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert_eq!(json(&out)["runs_on"], "source");
    assert_running_on_source_unchanged(&container, pid, &before);
    assert_destination_discarded(&dst, "f4");
    assert_no_record(&lab, "f4");
    assert_work_dir_clean(&lab);
}

#[test]
fn a_brief_cut_mid_transfer_does_not_fail_the_migration() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("f5", &format!("{}{GAME}", heap("384M", "0")));
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    let mut child = spawn_migrate(&lab, &container, &["--link-timeout", "10"]);
    wait_until_mid_transfer(&dst, "f5", &mut child);
    let cut = lab.hosts.cut_link();
    std::thread::sleep(Duration::from_secs(2));
    drop(cut);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_runs_on_destination_only(&dst, &container, &before);
    assert_no_record(&lab, "f5");
}

#[test]
fn a_cut_longer_than_the_link_timeout_mid_transfer_resumes_the_source_and_the_destination_discards()
{
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("f6", &format!("{}{GAME}", heap("384M", "0")));
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let mut child = spawn_migrate(&lab, &container, &["--link-timeout", "3"]);
    wait_until_mid_transfer(&dst, "f6", &mut child);
    let cut = lab.hosts.cut_link();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );
    assert_running_on_source_unchanged(&container, pid, &before);
    // Nothing was restored there: the destination drops it on its own once
    // its side of the link times out, link or no link.
    assert_destination_discarded(&dst, "f6");
    drop(cut);
    // The record says no decision was taken: the next migration settles it.
    let out = lab.migrate(&container, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_runs_on_destination_only(&dst, &container, &before);
    assert_no_record(&lab, "f6");
}

#[test]
fn a_second_migration_of_the_same_container_is_refused_while_the_first_runs() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("f7", &format!("{}{GAME}", heap("384M", "0")));
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    let mut first = spawn_migrate(&lab, &container, &[]);
    wait_until_mid_transfer(&dst, "f7", &mut first);
    let second = lab.migrate(&container, &[]);
    let err = stderr(&second);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is being migrated by another `migrate` process"),
        "{err}"
    );
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the first one failed: {}",
        stderr(&out)
    );
    assert_runs_on_destination_only(&dst, &container, &before);
    assert_no_record(&lab, "f7");
}

#[test]
fn link_lost_as_the_destination_restores_never_runs_two_copies_and_resolve_settles_it() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("f8", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let mut child = spawn_migrate(&lab, &container, &["--link-timeout", "3"]);
    wait_for_destination_phase(&dst, "f8", "held", &mut child);
    let cut = lab.hosts.cut_link();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    if out.status.code() == Some(1) {
        // The source went back: the destination, which cannot know that,
        // keeps its copy held, not running.
        assert_held_not_running(&dst, "f8");
    }
    // (Had the source decided, its Release may have arrived before the cut:
    // the copy then runs there, the source copy being gone.)
    drop(cut);
    // Without its record (say, the source's state dir was lost) resolve
    // settles nothing: it says what each host holds.
    let no_records = lab.path("no-records");
    let without_record = lab
        .resolve_command_in(
            &container,
            &no_records,
            &["--to", &format!("{DST_ADDR}:{DST_PORT}")],
        )
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&without_record.stdout).unwrap();
    let actions = report["actions"].to_string();
    assert!(
        actions.contains("no record of a migration of f8"),
        "{report}"
    );
    if out.status.code() == Some(1) {
        assert!(
            actions.contains("a restored copy, held (not running)"),
            "{report}"
        );
        assert_held_not_running(&dst, "f8");
    }
    let (code, resolution) = resolve(&lab, &container, &[]);
    match out.status.code() {
        // Restored never reached the source: it went back, and said that
        // the destination may hold a copy that resolve discards.
        Some(1) => {
            assert!(err.contains("`migrate resolve f8` discards it"), "{err}");
            assert_eq!(code, Some(1), "{resolution}");
            assert_eq!(resolution["runs_on"], "source", "{resolution}");
            assert_running_on_source_unchanged(&container, pid, &before);
            assert_destination_discarded(&dst, "f8");
        }
        // It did: the source decided, and resolve releases.
        Some(3) => {
            assert_eq!(code, Some(0), "{resolution}");
            assert_runs_on_destination_only(&dst, &container, &before);
        }
        other => panic!("exit {other:?}:\n{err}"),
    }
    assert_no_record(&lab, "f8");
    assert_work_dir_clean(&lab);
}

#[test]
fn a_destination_killed_during_the_layer_transfer_and_restarted_keeps_no_half_layer() {
    let lab = Lab::new();
    // A layer big enough to be caught crossing.
    sh(std::process::Command::new("sh").arg("-c").arg(format!(
        "head -c 200000000 /dev/urandom > {}/big.bin",
        lab.layer.display()
    )));
    let mut dst = lab.start_destination(&[]);
    let container = lab.start_container("f9", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let mut child = spawn_migrate(&lab, &container, &[]);
    let layers = dst.state_dir.join("layers");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_dir(&layers).is_ok_and(|dir| {
        dir.flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with(".incoming-")
                && e.path()
                    .join("big.bin")
                    .metadata()
                    .is_ok_and(|m| m.len() > 0)
        })
    }) {
        assert!(child.try_wait().unwrap().is_none(), "migrate ended first");
        assert!(Instant::now() < deadline, "the layer never began to arrive");
        std::thread::sleep(Duration::from_millis(10));
    }
    dst.kill();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is running on the source"), "{err}");
    assert_running_on_source_unchanged(&container, pid, &before);

    let dst = lab.start_destination(&[]);
    let left: Vec<_> = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "layers left after the restart: {left:?}");
    assert_destination_discarded(&dst, "f9");
    assert_no_record(&lab, "f9");
}

#[test]
fn a_destination_killed_during_the_restore_and_restarted_discards_it() {
    let lab = Lab::new();
    let mut dst = lab.start_destination(&[]);
    let container = lab.start_container("f10", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let mut child = spawn_migrate(&lab, &container, &[]);
    wait_for_destination_phase(&dst, "f10", "receiving", &mut child);
    dst.kill();
    let dst = lab.start_destination(&[]);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );
    assert_running_on_source_unchanged(&container, pid, &before);
    assert_destination_discarded(&dst, "f10");
    assert_no_record(&lab, "f10");
    assert_work_dir_clean(&lab);
}
