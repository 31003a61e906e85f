//! End-to-end post-copy migrations between two network-namespace hosts:
//! the container runs on the destination before its memory is there, and
//! its memory follows through the page tunnel on the migration's QUIC link.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use migrate_e2e::checks::{
    assert_destination_discarded, assert_heap_intact, assert_no_images,
    assert_running_on_source_unchanged, assert_work_dir_clean, counter, heap, stderr,
    wait_for_heap, wait_for_ticks, GAME,
};
use migrate_e2e::{mounts_under, runc_exec, wait_until, Destination, Lab, SourceContainer};

#[test]
fn post_copy_moves_the_container_before_its_memory() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("pc1", GAME);
    let before = wait_for_ticks(&container, 5);

    let out = lab.migrate(&container, &["--mode", "post-copy"]);
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["mode"]["used"], "post-copy", "{summary}");
    assert_eq!(summary["rounds"][0]["kind"], "lazy", "{summary}");
    assert!(summary["bytes_pages"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        summary["source_free_ms"].as_u64().unwrap() >= summary["downtime_ms"].as_u64().unwrap()
    );
    assert!(
        container.state().is_none(),
        "still registered on the source"
    );
    assert!(mounts_under(&container.runc_root).is_empty());
    assert_work_dir_clean(&lab);
    assert_no_images(&dst, "pc1");

    let exec = |args: &[&str]| runc_exec(&dst.runc_root, "pc1", args);
    let after = counter(exec);
    assert_eq!(after.0, before.0, "the in-memory token changed");
    wait_until("the game to go on", Duration::from_secs(10), || {
        counter(exec).1 >= after.1 + 3
    });
}

#[test]
fn post_copy_keeps_hundreds_of_mib_of_memory_intact() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let script = format!("{}{GAME}", heap("384M", "8M"));
    let container = lab.start_container("pc2", &script);
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    let out = lab.migrate(&container, &["--mode", "post-copy"]);
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let relayed = summary["bytes_pages"].as_u64().unwrap();
    assert!(
        relayed > 384 << 20,
        "the page tunnel carried {relayed} bytes, less than the heap: {summary}"
    );
    let rootfs = dst.container_dir("pc2").join("rootfs");
    assert_heap_intact(&dst.runc_root, "pc2", &rootfs);
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "pc2", args));
    assert_eq!(token, before.0);
}

/// Starts a post-copy migration of a container holding `heap` and returns
/// once the container is restored on the destination and the source has
/// recorded its decision, while the memory still crosses.
fn migrate_until_decided(
    lab: &Lab,
    dst: &Destination,
    container: &SourceContainer,
    extra: &[&str],
) -> std::process::Child {
    let mut args = vec!["--mode", "post-copy"];
    args.extend_from_slice(extra);
    let mut migrate = lab.migrate_command(container, &args);
    migrate
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = migrate.spawn().unwrap();
    wait_until(
        "the container to run on the destination",
        Duration::from_secs(60),
        || {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                panic!("migrate ended ({status}) before the restore:\n{err}");
            }
            let out = dst.runc(&["state", &container.id]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .is_ok_and(|s| s["status"] == "running")
        },
    );
    // Before the decision, a cut link or an interrupt sends the container
    // back to the source: these tests are about what comes after.
    wait_until("the source to decide", Duration::from_secs(20), || {
        lab.source_phase(&container.id).as_deref() == Some("decided")
    });
    child
}

#[test]
fn post_copy_resumes_the_page_transfer_after_the_link_comes_back() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("pc3", &format!("{}{GAME}", heap("384M", "0")));
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    let child = migrate_until_decided(
        &lab,
        &dst,
        &container,
        &["--link-timeout", "3", "--resume-timeout", "30"],
    );
    {
        // Longer than the link timeout: the connection is lost for good
        // and a new one must carry the transfer on.
        let _cut = lab.hosts.cut_link();
        std::thread::sleep(Duration::from_secs(6));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        summary["reconnects"].as_u64().unwrap() >= 1,
        "the transfer did not go through a new connection: {summary}"
    );
    assert!(
        container.state().is_none(),
        "still registered on the source"
    );
    let rootfs = dst.container_dir("pc3").join("rootfs");
    assert_heap_intact(&dst.runc_root, "pc3", &rootfs);
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "pc3", args));
    assert_eq!(token, before.0);
    assert!(
        dst.log_text().contains("the source is back"),
        "the destination did not take the new connection"
    );
}

#[test]
fn post_copy_holds_both_copies_when_the_link_stays_down() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("pc4", &format!("{}{GAME}", heap("384M", "0")));
    wait_for_heap(&container.rootfs);
    wait_for_ticks(&container, 3);
    let source_pid = container.state().unwrap()["pid"].as_u64().unwrap();

    let child = migrate_until_decided(
        &lab,
        &dst,
        &container,
        &["--link-timeout", "3", "--resume-timeout", "5"],
    );
    let cut = lab.hosts.cut_link();
    let out = child.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    // What CRIU still holds on both sides: ended at the end, whatever happens.
    let _holders = Holders::new(&report, &dst);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(3),
        "in doubt has its own exit code:\n{err}"
    );
    assert!(err.contains("in doubt"), "{err}");
    assert!(err.contains("Nothing runs twice"), "{err}");
    assert_eq!(
        report["runs_on"], "held, in doubt: see migrate resolve",
        "{report}"
    );
    assert!(err.contains("--go-back"), "{err}");

    // The original is held frozen on the source, with its process and
    // memory; the copy exists on the destination; only one can run.
    let state = container
        .state()
        .expect("the original is gone from the source");
    assert_eq!(state["status"], "paused", "{state}");
    assert_eq!(state["pid"].as_u64(), Some(source_pid));
    let frozen_at = std::fs::read_to_string(container.rootfs.join("work/counter")).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        std::fs::read_to_string(container.rootfs.join("work/counter")).unwrap(),
        frozen_at,
        "the original runs on the source"
    );
    assert!(
        dst.runc(&["state", "pc4"]).status.success(),
        "the destination gave up its copy"
    );
    assert!(dst.container_dir("pc4").exists());

    // The operator goes back once the link is up: the destination discards
    // its copy, the original runs on with its own process and memory.
    drop(cut);
    let out = lab
        .resolve_command(&container, &["--go-back"])
        .output()
        .unwrap();
    let said = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code(), Some(1), "runs on the source:\n{said}");
    let resolution: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resolution["runs_on"], "source", "{resolution}");
    let state = container.state().expect("the original is gone");
    assert_eq!(state["status"], "running", "{state}");
    assert_eq!(state["pid"].as_u64(), Some(source_pid));
    let frozen_count: u64 = frozen_at.trim().split_once(' ').unwrap().1.parse().unwrap();
    wait_for_ticks(&container, frozen_count + 2);
    assert_heap_intact(&container.runc_root, "pc4", &container.rootfs);
    assert_destination_discarded(&dst, "pc4");
    let records = lab.source_state_dir().join("migrations");
    let left: Vec<_> = std::fs::read_dir(&records)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|name| !name.to_string_lossy().ends_with(".json")),
        "records outlive the resolution: {left:?}"
    );
}

/// The processes a migration left holding a container in doubt: the
/// source's `runc checkpoint` (and its CRIU) and the destination's
/// lazy-pages daemon, both started by this test's agents. Killed on drop.
struct Holders {
    groups: Vec<i32>,
}

impl Holders {
    fn new(report: &serde_json::Value, dst: &Destination) -> Self {
        let mut groups = Vec::new();
        // runc checkpoint leads its own process group, CRIU in it.
        if let Some(pid) = report["held_by_pid"].as_i64() {
            groups.push(pid as i32);
        }
        // So does each lazy-pages daemon.
        for line in dst.log_text().lines() {
            if let Some((_, rest)) = line.split_once("lazy_pages_pid=") {
                let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(pid) = pid.parse() {
                    groups.push(pid);
                }
            }
        }
        Self { groups }
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for group in &self.groups {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(*group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn a_failed_lazy_restore_resumes_the_original_with_its_network() {
    let lab = Lab::new();
    lab.plant_layer_without("etc/game.conf");
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("pc5", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let out = lab.migrate(&container, &["--mode", "post-copy"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the destination failed at restore"), "{err}");
    assert!(err.contains("Can't open file etc/game.conf"), "{err}");
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );
    assert_running_on_source_unchanged(&container, pid, &before);
    // CRIU keeps its network lock after a failed lazy transfer; it was
    // taken off, or the server on the container's loopback would not answer.
    let served = container.exec(&["wget", "-qO-", "http://127.0.0.1:8080/counter"]);
    assert!(served.starts_with(&before.0), "served {served:?}");
    assert_destination_discarded(&dst, "pc5");
    assert_work_dir_clean(&lab);
}

#[test]
fn ctrl_c_once_the_container_runs_on_the_destination_does_not_go_back() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("pc6", &format!("{}{GAME}", heap("384M", "0")));
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    let child = migrate_until_decided(&lab, &dst, &container, &[]);
    // nsenter execs migrate: this is migrate's own pid.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "an interrupt after the decision point must not undo the migration:\n{err}"
    );
    assert!(err.contains("goes on until every page is there"), "{err}");
    assert!(
        container.state().is_none(),
        "still registered on the source"
    );
    let rootfs = dst.container_dir("pc6").join("rootfs");
    assert_heap_intact(&dst.runc_root, "pc6", &rootfs);
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "pc6", args));
    assert_eq!(token, before.0);
}
