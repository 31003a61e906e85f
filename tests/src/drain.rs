//! What the drain tests add to the lab: a second destination host (a third
//! network namespace with its own veth pair to the source, its own address
//! and certificate), and `migrate drain` run on the source host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{bin, sh, Destination, Lab, DST_ADDR, DST_PORT};

/// The second destination's address, and the source's on that link.
pub const DST2_ADDR: &str = "198.18.1.2";
pub const SRC_ADDR_TO_DST2: &str = "198.18.1.1";

/// A third host, joined to the source by its own veth pair; removed with
/// its namespace (which takes the pair along).
#[derive(Debug)]
pub struct SecondHost {
    pub ns: String,
}

impl Drop for SecondHost {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A lab whose source can reach two destination hosts.
#[derive(Debug)]
pub struct TwoDestinations {
    pub second: SecondHost,
    pub tls_dst2: PathBuf,
    /// Last: its temp dir goes after everything above.
    pub lab: Lab,
}

impl std::ops::Deref for TwoDestinations {
    type Target = Lab;

    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl TwoDestinations {
    pub fn new() -> Self {
        let lab = Lab::new();
        let n = lab.n;
        let ip = |args: &[&str]| sh(Command::new("ip").args(args));
        let second = SecondHost {
            ns: format!("me{n}e"),
        };
        ip(&["netns", "add", &second.ns]);
        let (vs, ve) = (format!("ve{n}t"), format!("ve{n}e"));
        ip(&["link", "add", &vs, "type", "veth", "peer", "name", &ve]);
        ip(&["link", "set", &vs, "netns", &lab.hosts.src]);
        ip(&["link", "set", &ve, "netns", &second.ns]);
        for (ns, addr, dev) in [
            (&lab.hosts.src, SRC_ADDR_TO_DST2, &vs),
            (&second.ns, DST2_ADDR, &ve),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        let tls_dst2 = lab.path("tls-dst2");
        sh(Command::new(bin("migrate"))
            .args(["certs", "issue", "--ca"])
            .arg(lab.path("ca"))
            .args(["--name", DST2_ADDR, "--role", "destination", "--out"])
            .arg(&tls_dst2));
        Self {
            second,
            tls_dst2,
            lab,
        }
    }

    /// `migrate-dst` on the second host.
    pub fn start_second_destination(&self, extra: &[&str]) -> Destination {
        self.lab
            .start_daemon(&self.second.ns, DST2_ADDR, &self.tls_dst2, "dst2", extra)
    }

    /// `--to` for both destinations.
    pub fn both(&self) -> [String; 4] {
        [
            "--to".into(),
            first_destination(),
            "--to".into(),
            second_destination(),
        ]
    }
}

impl Default for TwoDestinations {
    fn default() -> Self {
        Self::new()
    }
}

pub fn first_destination() -> String {
    format!("{DST_ADDR}:{DST_PORT}")
}

pub fn second_destination() -> String {
    format!("{DST2_ADDR}:{DST_PORT}")
}

impl Lab {
    /// The runc root of the source's containers.
    pub fn source_runc_root(&self) -> PathBuf {
        self.path("runc-src")
    }

    /// The options that point a drain at this lab's source: TLS, runc
    /// root, work and state dirs.
    pub fn drain_lab_options(&self) -> Vec<String> {
        let path = |p: &Path| p.to_str().unwrap().to_owned();
        vec![
            "--tls-dir".into(),
            path(&self.tls_src),
            "--runc-root".into(),
            path(&self.source_runc_root()),
            "--work-dir".into(),
            path(&self.work_dir()),
            "--state-dir".into(),
            path(&self.source_state_dir()),
        ]
    }

    /// `migrate drain --json` on the source host, with `extra` (--to ...).
    pub fn drain_command<S: AsRef<std::ffi::OsStr>>(&self, extra: &[S]) -> Command {
        let mut cmd = self.hosts.on(&self.hosts.src, &bin("migrate"));
        cmd.arg("drain")
            .args(self.drain_lab_options())
            .arg("--json")
            .args(extra)
            .stdin(Stdio::null());
        cmd
    }

    /// [`Lab::drain_command`] started, its output piped.
    pub fn spawn_drain<S: AsRef<std::ffi::OsStr>>(&self, extra: &[S]) -> RunningDrain {
        let child = self
            .drain_command(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        RunningDrain { child: Some(child) }
    }

    /// `migrate cancel --drain` for this lab's source state dir.
    pub fn cancel_drain_command(&self) -> Command {
        let mut cmd = Command::new(bin("migrate"));
        cmd.args(["cancel", "--drain", "--state-dir"])
            .arg(self.source_state_dir())
            .stdin(Stdio::null());
        cmd
    }
}

/// A drain running in the background; a test that fails before it ends
/// stops it with SIGTERM (its migrations roll back), then kills it.
#[derive(Debug)]
pub struct RunningDrain {
    child: Option<Child>,
}

impl RunningDrain {
    /// Its pid (nsenter execs it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    pub fn output(mut self) -> Output {
        self.child.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for RunningDrain {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
