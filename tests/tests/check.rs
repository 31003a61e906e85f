//! `migrate check` between the two namespace hosts: the preflight alone,
//! a verdict per item, and nothing frozen, claimed or recorded; and the
//! CPU check, which migrations pass too, refusing a source whose CPU the
//! destination's cannot stand in for before anything is frozen.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use migrate_e2e::checks::{
    assert_running_on_source_unchanged, assert_work_dir_clean, stderr, wait_for_ticks, GAME,
};
use migrate_e2e::{bin, Destination, Lab, SourceContainer, DST_ADDR, DST_PORT};

/// The items a destination reports, in its order.
const ITEMS: [&str; 15] = [
    "protocol",
    "container id",
    "criu version",
    "criu features",
    "criu options",
    "cpu",
    "runc",
    "existing container",
    "policy",
    "bind sources",
    "cgroup",
    "layers",
    "disk",
    "image space",
    "memory",
];

/// `migrate check` of `container` (named, or as the only container of its
/// runc root) against the lab's destination, run on the source host.
fn check(lab: &Lab, container: &SourceContainer, named: bool, extra: &[&str]) -> (Output, bool) {
    let mut cmd = lab.hosts.on(&lab.hosts.src, &bin("migrate"));
    cmd.arg("check")
        .args(named.then_some(&container.id))
        .arg("--to")
        .arg(format!("{DST_ADDR}:{DST_PORT}"))
        .arg("--tls-dir")
        .arg(&lab.tls_src)
        .arg("--runc-root")
        .arg(&container.runc_root)
        .args(extra);
    watching_the_freezer(lab, container, cmd)
}

/// Runs `cmd` while a watcher looks for `container`'s cgroup frozen at any
/// moment (cgroup v2's `cgroup.events`, or the v1 freezer's state);
/// returns its output and whether the container ever was frozen.
fn watching_the_freezer(
    lab: &Lab,
    container: &SourceContainer,
    mut cmd: Command,
) -> (Output, bool) {
    let cgroup = format!("migrate-e2e-{}-src/{}", lab.n, container.id);
    let v2 = Path::new("/sys/fs/cgroup")
        .join(&cgroup)
        .join("cgroup.events");
    let v1 = Path::new("/sys/fs/cgroup/freezer")
        .join(&cgroup)
        .join("freezer.state");
    let (state, frozen_line) = if v2.exists() {
        (v2, "frozen 1")
    } else {
        (v1, "FROZEN")
    };
    assert!(state.exists(), "no {}", state.display());
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut frozen = false;
            while !done.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string(&state).unwrap_or_default();
                // FREEZING too: on its way to frozen.
                frozen |= text.lines().any(|l| l == frozen_line || l == "FREEZING");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            frozen
        })
    };
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    done.store(true, Ordering::Relaxed);
    stderr(&out);
    (out, watcher.join().unwrap())
}

/// Nothing of a check is left anywhere: the container runs on the source
/// as it did, and neither host has a record, a work dir or a claim of it.
fn assert_untouched(lab: &Lab, dst: &Destination, container: &SourceContainer, pid: u64) {
    let before = wait_for_ticks(container, 1);
    assert_eq!(container.state().unwrap()["status"], "running");
    assert_running_on_source_unchanged(container, pid, &before);
    assert!(
        !dst.container_dir(&container.id).exists(),
        "the destination claimed {}",
        container.id
    );
    assert!(dst.runc(&["state", &container.id]).stdout.is_empty());
    assert!(
        lab.source_phase(&container.id).is_none(),
        "the source recorded a migration"
    );
    assert_work_dir_clean(lab);
}

#[test]
fn check_reports_every_item_and_moves_nothing() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("check1", GAME);
    wait_for_ticks(&container, 2);
    let pid = container.pid().unwrap();

    let (out, frozen) = check(&lab, &container, true, &["--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["version"], 1);
    assert_eq!(report["accepted"], true, "{report:#}");
    let verdicts = report["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 1, "{report:#}");
    let verdict = &verdicts[0];
    assert_eq!(verdict["container"], "check1");
    assert_eq!(verdict["destination"], format!("{DST_ADDR}:{DST_PORT}"));
    let items = verdict["items"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ITEMS, "{report:#}");
    for item in items {
        assert_eq!(item["ok"], true, "{item}");
        assert!(!item["detail"].as_str().unwrap().is_empty(), "{item}");
    }
    // The source sent its CPU, and this host's CRIU took it.
    let cpu = &items[5]["detail"];
    assert!(cpu.as_str().unwrap().contains("accepts"), "{cpu}");
    // The images are measured against the image dir, the rest against the
    // state dir's disk.
    let image_space = items[13]["detail"].as_str().unwrap();
    assert!(
        image_space.starts_with(&format!("{} has ", dst.image_dir.display()))
            && image_space.contains("the migration's images need about"),
        "{image_space}"
    );
    let disk = items[12]["detail"].as_str().unwrap();
    assert!(
        disk.contains("the migration's layers and the upper dir need about"),
        "{disk}"
    );

    assert!(!frozen, "the container was frozen during the check");

    // No id: every running container of the runc root, here the one.
    let (out, frozen) = check(&lab, &container, false, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("check1 → "), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("  ✓ ")).count(),
        ITEMS.len(),
        "{stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("  would move"), "{stdout}");
    assert!(!frozen, "the container was frozen during the check");
    assert_untouched(&lab, &dst, &container, pid);
}

#[test]
fn a_bind_source_the_policy_refuses_fails_its_item() {
    let lab = Lab::new();
    let shared = lab.path("shared");
    let other = lab.path("other");
    for dir in [&shared, &other] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let dst = lab.start_destination(&["--allow-bind", other.to_str().unwrap()]);
    let container = lab.start_container_binding("check2", GAME, &[(&shared, "/shared")]);
    wait_for_ticks(&container, 2);
    let pid = container.pid().unwrap();

    let (out, frozen) = check(&lab, &container, true, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("--- stdout:\n{stdout}---");
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let policy = stdout
        .lines()
        .find(|l| l.contains(" policy: "))
        .unwrap_or_else(|| panic!("no policy item:\n{stdout}"));
    assert!(policy.starts_with("  ✗ policy: "), "{policy}");
    assert!(
        policy.contains(&format!("bind mount source {}", shared.display())),
        "{policy}"
    );
    assert!(policy.contains("--allow-bind"), "{policy}");
    // Every other item passed, and the verdict says why it would not move.
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("  ✗")).collect();
    assert_eq!(failed, [policy], "{stdout}");
    assert!(stdout.contains("✓ cpu: "), "{stdout}");
    let last = stdout.lines().last().unwrap();
    assert!(
        last.starts_with("  would not move: bind mount source"),
        "{last}"
    );

    assert!(!frozen, "the container was frozen during the check");
    assert_untouched(&lab, &dst, &container, pid);
}

/// A CRIU for the source that reports the recorded CPU of another machine
/// (testdata/knights-mill-cpuinfo.img in migrate-dst) and is the real CRIU
/// otherwise.
fn criu_on_another_cpu(lab: &Lab) -> std::path::PathBuf {
    let image = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrate-dst/tests/testdata/knights-mill-cpuinfo.img");
    assert!(image.exists(), "no {}", image.display());
    let wrapper = lab.path("criu-on-another-cpu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             if [ \"$1 $2 $3\" = 'cpuinfo dump -D' ]; then exec cp '{}' \"$4/cpuinfo.img\"; fi\n\
             exec criu \"$@\"\n",
            image.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    wrapper
}

#[test]
fn a_migration_from_another_cpu_is_refused_before_anything_is_frozen() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("cpu1", GAME);
    wait_for_ticks(&container, 2);
    let pid = container.pid().unwrap();
    let criu = criu_on_another_cpu(&lab);

    let cmd = lab.migrate_command(&container, &["--criu", criu.to_str().unwrap()]);
    let (out, frozen) = watching_the_freezer(&lab, &container, cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the destination refused the migration"),
        "{err}"
    );
    assert!(err.contains("criu cpuinfo check"), "{err}");
    // CRIU's own reason, from the destination's `criu cpuinfo check`.
    assert!(err.contains("Error (criu/arch/x86/cpu.c"), "{err}");
    assert!(!frozen, "the container was frozen before the refusal");
    assert_untouched(&lab, &dst, &container, pid);
}
