//! End-to-end migrations of workloads CRIU needs options for: a server
//! under client load, a container with a stopped task, file locks, files
//! open under a removed name. Run as root, one at a time.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use migrate_e2e::checks::{
    assert_destination_discarded, assert_running_on_source_unchanged, assert_work_dir_clean,
    counter, stderr, wait_for_ticks, GAME,
};
use migrate_e2e::workloads::{accept_queue, install_tools, lines_in, output_within, ClientLoad};
use migrate_e2e::{mounts_under, runc_exec, wait_until, Destination, Lab, SourceContainer};

/// A migration must end well within this, whatever the workload.
const DEADLINE: Duration = Duration::from_secs(90);

/// The game, plus an echo server on :9000 that serves one client at a
/// time, with one client served (an established connection inside the
/// container, pinging it and writing the echoes to /work/echoes) and one
/// waiting in its accept queue (in flight, as a half-open client leaves one
/// at redis).
fn busy_server() -> String {
    format!(
        "mkdir -p /work\n\
         socat TCP-LISTEN:9000,fork,max-children=1 EXEC:cat &\n\
         sleep 0.3\n\
         (while true; do echo ping; sleep 0.2; done) | nc 127.0.0.1 9000 > /work/echoes &\n\
         sleep 0.3\n\
         sleep 1000 | nc 127.0.0.1 9000 &\n\
         {GAME}"
    )
}

/// Waits until the busy server has its served client pinging and its
/// client in flight.
fn wait_for_busy_server(container: &SourceContainer) {
    let exec = |args: &[&str]| container.exec(args);
    wait_until(
        "echoes of the served client",
        Duration::from_secs(10),
        || lines_in(exec, "/work/echoes") >= 3,
    );
    let pid = container.pid().unwrap();
    wait_until("a client in flight", Duration::from_secs(10), || {
        accept_queue(pid, 9000) == 1
    });
}

/// Migrates `container` with `extra`, which must succeed; returns the
/// summary.
fn migrate_ok(lab: &Lab, container: &SourceContainer, extra: &[&str]) -> serde_json::Value {
    let out = output_within(lab.migrate_command(container, extra), DEADLINE);
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Migrates `container` with `extra`, which must fail with the container
/// still running on the source as it was; returns what migrate said.
fn migrate_refused(
    lab: &Lab,
    dst: &Destination,
    container: &SourceContainer,
    extra: &[&str],
) -> String {
    let pid = container.pid().unwrap();
    let before = wait_for_ticks(container, 3);
    let out = output_within(lab.migrate_command(container, extra), DEADLINE);
    let said = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "must run on the source:\n{said}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["runs_on"], "source", "{json}");
    assert_running_on_source_unchanged(container, pid, &before);
    assert_destination_discarded(dst, &container.id);
    assert_work_dir_clean(lab);
    said
}

/// The container runs on the destination, once, with its memory: same
/// token, a counter that goes on from where it was and never back.
fn assert_moved(dst: &Destination, container: &SourceContainer, before: &(String, u64), lab: &Lab) {
    assert!(
        container.state().is_none(),
        "the container is still registered on the source"
    );
    assert!(mounts_under(&container.runc_root).is_empty());
    assert_work_dir_clean(lab);
    let exec = |args: &[&str]| runc_exec(&dst.runc_root, &container.id, args);
    let after = counter(exec);
    assert_eq!(after.0, before.0, "restarted, not migrated");
    assert!(
        after.1 >= before.1,
        "the counter went back: {before:?} -> {after:?}"
    );
    wait_until(
        "the game to go on on the destination",
        Duration::from_secs(10),
        || counter(exec).1 >= after.1 + 3,
    );
}

#[test]
fn a_server_under_client_load_moves_with_its_connections_closed() {
    let lab = Lab::new();
    install_tools(&lab);
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("load1", &busy_server());
    let before = wait_for_ticks(&container, 3);
    wait_for_busy_server(&container);
    let load = ClientLoad::start(&lab, container.pid().unwrap());
    wait_until("clients to be served", Duration::from_secs(10), || {
        load.served() >= 5
    });

    migrate_ok(&lab, &container, &[]);
    drop(load);

    assert_moved(&dst, &container, &before, &lab);
    let exec = |args: &[&str]| runc_exec(&dst.runc_root, "load1", args);
    // The served connection came back closed: no more echoes, and the
    // server's one slot is free, for a new client (the one in flight was
    // left behind).
    let echoes = lines_in(exec, "/work/echoes");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lines_in(exec, "/work/echoes"), echoes, "restored open");
    let echoed = exec(&["sh", "-c", "echo again | timeout 5 nc 127.0.0.1 9000"]);
    assert_eq!(echoed.trim(), "again", "the busy server does not serve");
    let served = exec(&["wget", "-qO-", "http://127.0.0.1:8080/counter"]);
    assert!(served.starts_with(&before.0), "served {served:?}");
}

#[test]
fn tcp_established_keeps_connections_inside_the_container_open() {
    let lab = Lab::new();
    install_tools(&lab);
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("load2", &busy_server());
    let before = wait_for_ticks(&container, 3);
    wait_for_busy_server(&container);

    migrate_ok(&lab, &container, &["--tcp-established"]);

    assert_moved(&dst, &container, &before, &lab);
    let exec = |args: &[&str]| runc_exec(&dst.runc_root, "load2", args);
    // The served client goes on pinging through its connection.
    let echoes = lines_in(exec, "/work/echoes");
    wait_until("echoes on the destination", Duration::from_secs(10), || {
        lines_in(exec, "/work/echoes") >= echoes + 3
    });
}

#[test]
fn a_stopped_task_is_refused_before_anything_is_frozen() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let script = format!("sleep 1000 &\necho $! > /stopped.pid\nkill -STOP $!\n{GAME}");
    let container = lab.start_container("stopped1", &script);
    wait_for_ticks(&container, 2);
    let inner = std::fs::read_to_string(container.rootfs.join("stopped.pid")).unwrap();
    let inner = inner.trim();

    let said = migrate_refused(&lab, &dst, &container, &[]);
    assert!(
        said.contains(&format!("({inner} in the container)"))
            && said.contains("stopped")
            && said.contains("kill -CONT")
            && said.contains("Nothing was frozen"),
        "the refusal must name the stopped task and what to do: {said}"
    );

    // Doing what it says makes the migration possible.
    container.exec(&["kill", "-CONT", inner]);
    let before = wait_for_ticks(&container, 2);
    migrate_ok(&lab, &container, &[]);
    assert_moved(&dst, &container, &before, &lab);
}

#[test]
fn file_locks_move_with_file_locks_and_without_it_the_source_keeps_running() {
    let lab = Lab::new();
    install_tools(&lab);
    let dst = lab.start_destination(&[]);
    let script = format!("mkdir -p /work\nflock /work/db.lock sleep 1000 &\n{GAME}");
    let container = lab.start_container("locks1", &script);
    let probe = [
        "sh",
        "-c",
        "flock -n /work/db.lock true && echo free || echo held",
    ];
    wait_until("the lock to be held", Duration::from_secs(10), || {
        container.exec(&probe).trim() == "held"
    });

    let said = migrate_refused(&lab, &dst, &container, &[]);
    assert!(
        said.contains("file-locks"),
        "CRIU's reason must reach the user: {said}"
    );

    let before = wait_for_ticks(&container, 2);
    migrate_ok(&lab, &container, &["--file-locks"]);
    assert_moved(&dst, &container, &before, &lab);
    let held = runc_exec(&dst.runc_root, "locks1", &probe);
    assert_eq!(held.trim(), "held", "the lock did not move");
}

#[test]
fn link_remap_moves_a_file_open_under_a_removed_name() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    // Open under /work/a, still linked as /work/b: no name to reopen it by.
    let script = format!(
        "mkdir -p /work\necho kept > /work/a\nln /work/a /work/b\nexec 4</work/a\nrm /work/a\n{GAME}"
    );
    let container = lab.start_container("remap1", &script);
    wait_for_ticks(&container, 2);

    let said = migrate_refused(&lab, &dst, &container, &[]);
    assert!(
        said.contains("/work/a"),
        "CRIU's reason must name the file: {said}"
    );

    let before = wait_for_ticks(&container, 2);
    migrate_ok(&lab, &container, &["--link-remap"]);
    assert_moved(&dst, &container, &before, &lab);
    let exec = |args: &[&str]| runc_exec(&dst.runc_root, "remap1", args);
    assert_eq!(exec(&["cat", "/proc/1/fd/4"]).trim(), "kept");
    assert_eq!(exec(&["cat", "/work/b"]).trim(), "kept");
    // CRIU removed the link it made for the dump once it had reopened it.
    let left = exec(&["ls", "-a", "/work"]);
    assert!(!left.contains("link_remap"), "left in the rootfs: {left}");
}

#[test]
fn ext_unix_sk_moves_a_socket_connected_to_a_host_service() {
    let lab = Lab::new();
    install_tools(&lab);
    // A host service the container logs to over a unix datagram socket in a
    // dir bind-mounted into it (both hosts see the same path here, as two
    // hosts would with the service on each).
    let shared = lab.path("ext");
    std::fs::create_dir_all(&shared).unwrap();
    let received = shared.join("received");
    let dst = lab.start_destination(&["--allow-bind", shared.to_str().unwrap()]);
    let script = format!(
        "mkdir -p /work\n\
         (while [ ! -S /ext/log.sock ]; do sleep 0.1; done; \
          while true; do cat /work/counter 2>/dev/null || true; sleep 0.2; done \
          | socat -u - UNIX-CONNECT:/ext/log.sock,type=2) &\n{GAME}"
    );
    let container = lab.start_container_binding("extsk1", &script, &[(&shared, "/ext")]);
    // In the container's network namespace, where CRIU sees sockets, and
    // its mount namespace, so that the socket's name is one the restored
    // copy can reach, but outside the processes CRIU dumps: an external peer.
    let service = HostLogService::start(&received, container.pid().unwrap());
    let before = wait_for_ticks(&container, 3);
    wait_until(
        "the service to hear the container",
        Duration::from_secs(10),
        || service.lines_with(&before.0) > 0,
    );

    let said = migrate_refused(&lab, &dst, &container, &[]);
    assert!(
        said.contains("--ext-unix-sk"),
        "CRIU's reason must reach the user: {said}"
    );

    let before = wait_for_ticks(&container, 2);
    migrate_ok(&lab, &container, &["--ext-unix-sk"]);
    assert_moved(&dst, &container, &before, &lab);
    // The restored copy still talks to the service through its socket.
    let heard = service.lines_with(&before.0);
    wait_until(
        "the restored copy to reach the service",
        Duration::from_secs(10),
        || service.lines_with(&before.0) > heard + 3,
    );
}

/// A unix datagram socket bound outside the container's processes, in its
/// namespaces; what it receives is appended to a file. Ended on drop.
struct HostLogService {
    child: std::process::Child,
    received: std::path::PathBuf,
}

impl HostLogService {
    /// Binds /ext/log.sock in the namespaces of process `pid`, writing to
    /// /ext/received there, which is `received` here.
    fn start(received: &std::path::Path, pid: u64) -> Self {
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .args([
                "socat",
                "-u",
                "UNIX-RECV:/ext/log.sock",
                "OPEN:/ext/received,creat,append",
            ])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let socket = received.with_file_name("log.sock");
        wait_until("the service socket", Duration::from_secs(5), || {
            socket.exists()
        });
        Self {
            child,
            received: received.to_owned(),
        }
    }

    fn lines_with(&self, token: &str) -> usize {
        std::fs::read_to_string(&self.received)
            .map(|t| t.lines().filter(|l| l.contains(token)).count())
            .unwrap_or(0)
    }
}

impl Drop for HostLogService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
