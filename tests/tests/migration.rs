//! End-to-end migrations between two network-namespace hosts with real CRIU
//! and runc. Run as root, one at a time (`--test-threads=1`: CRIU and runc
//! use host-wide resources).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use migrate_e2e::checks::{
    assert_destination_discarded, assert_no_images, assert_running_on_source_unchanged,
    assert_work_dir_clean, counter, heap, stderr, wait_for_heap, wait_for_ticks,
    wait_until_mid_transfer, GAME,
};
use migrate_e2e::{mounts_under, runc_exec, wait_until, Destination, Lab, SourceContainer};

#[test]
fn migration_preserves_memory_files_and_rootfs_changes() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("game1", GAME);
    let before = wait_for_ticks(&container, 5);

    let out = lab.migrate(&container, &[]);
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["container"], "game1");
    assert_eq!(summary["version"], 1, "{summary}");
    assert!(summary["downtime_ms"].as_u64().unwrap() > 0, "{summary}");
    let (raw, compressed, wire) = (
        summary["bytes_raw"].as_u64().unwrap(),
        summary["bytes_compressed"].as_u64().unwrap(),
        summary["bytes_wire"].as_u64().unwrap(),
    );
    // auto: the layer and upper dir go zstd, the frozen step as the rule
    // chose, which the summary says in one line.
    assert_eq!(summary["compression"]["requested"], "auto", "{summary}");
    let codec = summary["compression"]["codec"].as_str().unwrap();
    assert!(compressed < raw, "zstd did not shrink the layer: {summary}");
    let reason = summary["compression"]["reason"].as_str().unwrap();
    assert!(!reason.is_empty() && !reason.contains('\n'), "{summary}");
    assert!(
        reason.contains("not compressing") == (codec == "none"),
        "the reason says otherwise than the codec: {summary}"
    );
    assert!(
        wire > compressed,
        "the link carried less than the payload: {summary}"
    );
    assert_eq!(summary["layers_sent"], 1);
    // This host has no soft-dirty tracking: auto falls back, and says why.
    assert_eq!(summary["mode"]["requested"], "auto");
    assert_eq!(summary["mode"]["used"], "stop-and-copy", "{summary}");
    let reason = summary["mode"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("soft-dirty") && !reason.contains('\n'),
        "auto must say in one line why it fell back: {reason:?}"
    );
    let rounds = summary["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "one round, the final dump: {summary}");
    assert_eq!(rounds[0]["kind"], "final");
    assert!(
        rounds[0]["pages_written"].as_u64().unwrap() > 0,
        "{summary}"
    );

    // Gone from the source, with nothing left behind; the destination's
    // images went at the commit.
    assert!(
        container.state().is_none(),
        "the container is still registered on the source"
    );
    assert_no_images(&dst, "game1");
    assert!(!dst.container_dir("game1").join("images").exists());
    assert!(mounts_under(&container.runc_root).is_empty());
    assert_work_dir_clean(&lab);

    // Running on the destination under the same id, registered with runc.
    let state: serde_json::Value =
        serde_json::from_slice(&dst.runc(&["state", "game1"]).stdout).unwrap();
    assert_eq!(state["status"], "running");
    let exec = |args: &[&str]| runc_exec(&dst.runc_root, "game1", args);
    let after = counter(exec);
    assert_eq!(
        after.0, before.0,
        "the in-memory token changed: restarted, not migrated"
    );
    assert!(
        after.1 >= before.1,
        "the counter went back: {before:?} -> {after:?}"
    );
    wait_until(
        "the game to go on on the destination",
        Duration::from_secs(10),
        || counter(exec).1 >= after.1 + 3,
    );

    // Open files, cwd and pids inside the pid namespace are as they were.
    assert_eq!(exec(&["readlink", "/proc/1/cwd"]).trim(), "/work");
    assert_eq!(exec(&["readlink", "/proc/1/fd/3"]).trim(), "/etc/game.conf");
    // Rootfs changes: the file created in the upper dir, and the whiteout.
    assert_eq!(
        exec(&["cat", "/work/made-before"]).trim(),
        "made before the migration"
    );
    assert_eq!(
        exec(&[
            "sh",
            "-c",
            "test -e /etc/group && echo present || echo absent"
        ])
        .trim(),
        "absent"
    );
    // The server on the container's loopback answers (the network hook).
    let served = exec(&["wget", "-qO-", "http://127.0.0.1:8080/counter"]);
    assert!(served.starts_with(&before.0), "served {served:?}");
    // The container's output now goes to the destination's log.
    let log_path = dst.container_dir("game1").join("stdio.log");
    wait_until(
        "output in the destination's stdio.log",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains(&format!("tick {}", before.0))
        },
    );
    assert!(container
        .output
        .lock()
        .unwrap()
        .contains(&format!("tick {} 1\n", before.0)));
    // A second container on the same layer: the destination has the layer
    // now, so only the new container's own state crosses.
    let second = lab.start_container("game1b", GAME);
    wait_for_ticks(&second, 2);
    let out = lab.migrate(&second, &[]);
    assert!(
        out.status.success(),
        "second migrate failed:\n{}",
        stderr(&out)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["layers_sent"], 0, "{summary}");
    assert_eq!(summary["layers_reused"], 1, "{summary}");

    // runc kill works on it like on any container of that root.
    assert!(dst.runc(&["kill", "game1", "KILL"]).status.success());
    wait_until("the container to stop", Duration::from_secs(5), || {
        let state: serde_json::Value =
            serde_json::from_slice(&dst.runc(&["state", "game1"]).stdout).unwrap_or_default();
        state["status"] == "stopped"
    });
}

#[test]
fn destination_that_refuses_leaves_the_container_untouched() {
    let lab = Lab::new();
    let dst = lab.start_destination(&["--criu", "/nonexistent/criu"]);
    let container = lab.start_container("game2", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let out = lab.migrate(&container, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("the destination refused the migration"),
        "{err}"
    );
    assert!(err.contains("CRIU is not usable"), "{err}");
    assert!(
        err.contains("was not touched and is running on the source"),
        "{err}"
    );

    assert_running_on_source_unchanged(&container, pid, &before);
    assert!(
        !dst.container_dir("game2").exists(),
        "the destination kept state for a refused migration"
    );
    assert!(dst.runc(&["state", "game2"]).stdout.is_empty());
    assert_work_dir_clean(&lab);
}

#[test]
fn failed_restore_resumes_the_container_on_the_source() {
    let lab = Lab::new();
    // The destination's copy of the layer lacks the file the game holds open,
    // so CRIU's restore fails to reopen it: a real restore failure.
    lab.plant_layer_without("etc/game.conf");

    let dst = lab.start_destination(&[]);
    let container = lab.start_container("game3", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let out = lab.migrate(&container, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("the destination failed at restore"), "{err}");
    assert!(
        err.contains("Can't open file etc/game.conf"),
        "the error must show the destination's CRIU log: {err}"
    );
    // The logs outlive the rollback, where the message says they are.
    let kept = lab.path("dst-state").join("failed");
    let log_dir = std::fs::read_dir(&kept)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let restore_log = log_dir.join("criu/restore.log");
    assert!(err.contains(&restore_log.display().to_string()), "{err}");
    assert!(std::fs::read_to_string(&restore_log)
        .unwrap()
        .contains("Restoring FAILED"));
    // The logs, not the images: those go with the rest.
    assert!(!log_dir.join("images").exists());
    assert_no_images(&dst, "game3");
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );

    assert_running_on_source_unchanged(&container, pid, &before);
    assert_destination_discarded(&dst, "game3");
    assert_work_dir_clean(&lab);
}

/// The game with 384 MiB of memory beside it: sending its memory, which
/// happens while the container is frozen, takes long enough to cut the
/// migration in the middle.
fn heavy_game() -> String {
    format!("{}{GAME}", heap("384M", "0"))
}

/// Starts a container made with [`heavy_game`] and waits for its memory.
fn start_heavy(lab: &Lab, id: &str) -> SourceContainer {
    let container = lab.start_container(id, &heavy_game());
    wait_for_heap(&container.rootfs);
    container
}

/// Starts migrating a container made with [`heavy_game`] and returns once
/// its memory is arriving at the destination: the container is frozen then.
fn migrate_until_mid_transfer(
    lab: &Lab,
    dst: &Destination,
    container: &SourceContainer,
    extra: &[&str],
) -> std::process::Child {
    let mut migrate = lab.migrate_command(container, extra);
    migrate
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = migrate.spawn().unwrap();
    wait_until_mid_transfer(dst, &container.id, &mut child);
    child
}

#[test]
fn interrupting_the_source_resumes_the_container() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = start_heavy(&lab, "game5");
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    // nsenter execs migrate, so this is migrate's own pid: Ctrl-C reaches
    // it (and, because runc runs in its own process group, only it).
    let child = migrate_until_mid_transfer(&lab, &dst, &container, &[]);
    let migrate_pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(migrate_pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("error: interrupted"), "{err}");
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );
    assert_running_on_source_unchanged(&container, pid, &before);
    assert_destination_discarded(&dst, "game5");
    assert_work_dir_clean(&lab);
}

#[test]
fn freeze_timeout_resumes_the_container() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = start_heavy(&lab, "game6");
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let started = Instant::now();
    let out = lab.migrate(&container, &["--freeze-timeout", "1"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no answer from the destination within the freeze timeout"),
        "{err}"
    );
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the timeout did not cut the migration short"
    );
    assert_running_on_source_unchanged(&container, pid, &before);
    assert_destination_discarded(&dst, "game6");
    assert_work_dir_clean(&lab);
}

#[test]
fn killing_the_destination_mid_transfer_resumes_the_container() {
    let lab = Lab::new();
    let mut dst = lab.start_destination(&[]);
    let container = start_heavy(&lab, "game4");
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let child = migrate_until_mid_transfer(&lab, &dst, &container, &[]);
    dst.kill();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );
    assert_running_on_source_unchanged(&container, pid, &before);
    assert_work_dir_clean(&lab);
    assert!(
        dst.images_of("game4").join("final").is_dir(),
        "the killed destination held no images to leave behind"
    );
    // Images of no container dir at all: left by a daemon killed between
    // the removal of a container dir and that of its images.
    let orphan = dst.images_of("orphan8").join("final");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("pages-1.img"), [0u8; 4096]).unwrap();

    // A restarted destination removes what the killed one left half-done.
    let dst = lab.start_destination(&[]);
    assert_destination_discarded(&dst, "game4");
    assert!(dst
        .log_text()
        .contains("removed state left by an interrupted migration"));
    assert_no_images(&dst, "orphan8");
    assert!(
        dst.log_text()
            .contains("removed images left by an earlier run"),
        "{}",
        dst.log_text()
    );
}

#[test]
fn killing_the_source_agent_mid_transfer_resumes_the_container() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = start_heavy(&lab, "game7");
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    // SIGKILL: no rollback code runs. CRIU's post-dump hook loses the agent
    // and makes CRIU resume the container by itself.
    let mut child = migrate_until_mid_transfer(&lab, &dst, &container, &[]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_running_on_source_unchanged(&container, pid, &before);
    // The destination notices the silent link (idle timeout) and cleans up.
    wait_until(
        "the destination to give up on the link",
        Duration::from_secs(40),
        || !dst.container_dir("game7").exists(),
    );
    assert_destination_discarded(&dst, "game7");

    // The container can still be moved, and that run removes the killed
    // agent's work dir.
    let out = lab.migrate(&container, &[]);
    assert!(
        out.status.success(),
        "migrate after the kill failed:\n{}",
        stderr(&out)
    );
    assert_work_dir_clean(&lab);
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "game7", args));
    assert_eq!(token, before.0);
}

/// Changes the rootfs while it is being sent: 100 MB to make the pre-send
/// take a while, then every 0.1 s a new file, the removal of an older one,
/// a line appended, and at set ticks a whiteout, a dir replaced, a hard
/// link and an opaque dir. The end state is fixed whatever the timing.
const CHURN: &str = r#"
set -e
head -c 100000000 /dev/urandom > /blob
mkdir -p /work
i=0
while [ $i -lt 100 ]; do
    i=$((i + 1))
    echo "v$i" > /work/f$i
    if [ $i -gt 2 ]; then rm /work/f$((i - 2)); fi
    echo "$i" >> /work/log
    case $i in
        10) rm /etc/passwd ;;
        20) mkdir -p /work/d; echo x > /work/d/x ;;
        30) rm -rf /work/d; mkdir /work/d; echo y > /work/d/y ;;
        40) ln /work/log /work/log.link ;;
        50) rm -rf /root; mkdir /root; echo z > /root/z ;;
    esac
    sleep 0.1
done
touch /work/done
while true; do sleep 1; done
"#;

#[test]
fn rootfs_changes_made_while_it_is_sent_arrive_exactly() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("churn1", CHURN);
    wait_until("the churn to start", Duration::from_secs(30), || {
        container.upper.join("work/f3").exists()
    });
    let out = lab.migrate(&container, &[]);
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exec = |args: &[&str]| runc_exec(&dst.runc_root, "churn1", args);
    assert!(
        exec(&["sh", "-c", "test -e /work/done && echo done || echo running"]).trim() == "running",
        "the churn ended before the migration did: nothing was changed while the rootfs crossed ({summary})"
    );
    wait_until(
        "the churn to end on the destination",
        Duration::from_secs(60),
        || exec(&["sh", "-c", "test -e /work/done && echo y || echo n"]).trim() == "y",
    );
    let files = exec(&["sh", "-c", "cd /work && ls f* | sort"]);
    assert_eq!(
        files.split_whitespace().collect::<Vec<_>>(),
        ["f100", "f99"]
    );
    assert_eq!(exec(&["cat", "/work/f99"]).trim(), "v99");
    let log = exec(&["cat", "/work/log"]);
    let expected: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        expected,
        "lines appended while the rootfs crossed were lost"
    );
    let absent = |path: &str| {
        exec(&[
            "sh",
            "-c",
            &format!("test -e {path} && echo present || echo absent"),
        ])
        .trim()
        .to_owned()
    };
    assert_eq!(
        absent("/etc/passwd"),
        "absent",
        "the whiteout did not arrive"
    );
    assert_eq!(
        absent("/work/d/x"),
        "absent",
        "the replaced dir kept old entries"
    );
    assert_eq!(exec(&["cat", "/work/d/y"]).trim(), "y");
    assert_eq!(exec(&["cat", "/root/z"]).trim(), "z");
    assert_eq!(
        exec(&["ls", "-A", "/root"]).trim(),
        "z",
        "the opaque dir shows lower entries"
    );
    assert_eq!(exec(&["stat", "-c", "%h", "/work/log"]).trim(), "2");
    assert_eq!(exec(&["cat", "/work/log.link"]), log);
    assert_eq!(exec(&["stat", "-c", "%s", "/blob"]).trim(), "100000000");
}
