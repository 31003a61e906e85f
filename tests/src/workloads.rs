//! Support for the workload tests: the host tools a workload needs copied
//! into the busybox layer, clients that load a container's servers from
//! outside it, and a `migrate` run that must end by a deadline.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{install_binary, Lab};

/// Host tools busybox lacks: `socat` (a server that serves one client at a
/// time, so that the next one waits in its accept queue) and util-linux's
/// `flock` (a process holding a file lock).
pub fn install_tools(lab: &Lab) {
    for tool in ["/usr/bin/socat", "/usr/bin/flock"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install socat util-linux"
        );
        install_binary(&lab.layer, Path::new(tool));
    }
}

/// A loop of HTTP clients against the container's server on :8080, run on
/// the source host in the container's network namespace (where its server
/// listens); each served request appends a line to `served`. Ended, with
/// its clients, on drop.
#[derive(Debug)]
pub struct ClientLoad {
    child: Child,
    served: std::path::PathBuf,
}

impl ClientLoad {
    pub fn start(lab: &Lab, container_pid: u64) -> Self {
        let served = lab.path(&format!("served-{container_pid}"));
        let script = format!(
            "while true; do printf 'GET /counter HTTP/1.0\\r\\n\\r\\n' \
             | busybox nc -w 1 127.0.0.1 8080 | grep -q '200 OK' && echo ok >> {}; done",
            served.display()
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{container_pid}/ns/net"))
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: the drop ends the loop and its client.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Self {
            child: cmd.spawn().unwrap(),
            served,
        }
    }

    /// Requests served so far.
    pub fn served(&self) -> usize {
        std::fs::read_to_string(&self.served)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for ClientLoad {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to its end; fails the test if it has not ended within
/// `deadline` (after killing it): a migration must never hang.
pub fn output_within(mut cmd: Command, deadline: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let started = Instant::now();
    match ended.recv_timeout(deadline) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            panic!(
                "migrate did not end within {:?}: it hangs",
                started.elapsed()
            );
        }
    }
}

/// Connections waiting in the accept queue of the listener on `port` in
/// the network namespace of process `pid`, as `ss` on the host reports them.
pub fn accept_queue(pid: u64, port: u16) -> u64 {
    let out = crate::sh(
        Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["ss", "-Htln", &format!("sport = :{port}")]),
    );
    out.split_whitespace()
        .nth(1)
        .and_then(|queued| queued.parse().ok())
        .unwrap_or(0)
}

/// Lines in a file of the container's, read through `exec`.
pub fn lines_in(exec: impl Fn(&[&str]) -> String, path: &str) -> usize {
    exec(&["cat", path]).lines().count()
}
