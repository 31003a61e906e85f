//! The `migrate-dst` daemon of a test, and what it leaves behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::{remove_cgroup_parent, runc_delete, unmount_under};

/// The `migrate-dst` daemon of a test.
#[derive(Debug)]
pub struct Destination {
    pub(crate) child: Option<Child>,
    pub state_dir: PathBuf,
    /// Its `--image-dir`, removed with it.
    pub image_dir: PathBuf,
    pub runc_root: PathBuf,
    pub log: PathBuf,
    pub(crate) cgroup_parent: String,
}

impl Destination {
    pub fn runc(&self, args: &[&str]) -> Output {
        Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("containers").join(id)
    }

    /// Where the daemon holds the images of container `id`.
    pub fn images_of(&self, id: &str) -> PathBuf {
        self.image_dir.join(id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid (nsenter execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A held copy outlives its daemon by design: its hook waits for the
        // next run. This test's runs are over, so the hooks go (CRIU then
        // kills the held processes), and the restores they held end.
        for pid in processes_naming(&self.state_dir) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        // No panic here: a drop may run while a failed test unwinds.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !processes_naming(&self.runc_root).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        unmount_under(&self.state_dir);
        unmount_under(&self.runc_root);
        if let Ok(entries) = std::fs::read_dir(&self.runc_root) {
            for entry in entries.flatten() {
                runc_delete(&self.runc_root, &entry.file_name().to_string_lossy());
            }
        }
        remove_cgroup_parent(&self.cgroup_parent);
        // A link to a test's own tmpfs goes alone (the tmpfs guard removes
        // the tmpfs).
        let _ = if self.image_dir.is_symlink() {
            std::fs::remove_file(&self.image_dir)
        } else {
            std::fs::remove_dir_all(&self.image_dir)
        };
    }
}

/// Processes whose command line names `dir`: what this test's agents
/// started there (the dirs are the test's own temp dirs).
fn processes_naming(dir: &Path) -> Vec<nix::unistd::Pid> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            (pid != std::process::id() as i32 && cmdline.windows(needle.len()).any(|w| w == needle))
                .then(|| nix::unistd::Pid::from_raw(pid))
        })
        .collect()
}
