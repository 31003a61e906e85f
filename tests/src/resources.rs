//! Support for the resource and fault tests (`tests/tests/resources.rs`): a
//! small tmpfs to run out of, a daemon's peak memory, and the test build of
//! `migrate` that corrupts a stream on request.

use std::path::{Path, PathBuf};

use crate::{bin, mounts_under, unmount_under};

/// A tmpfs of a given size reached through a symlink (so that the mounts
/// a daemon makes below it are told apart from the tmpfs itself), unmounted
/// with anything below it when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    /// Where the tmpfs is mounted.
    pub mount_point: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_mib` beside `link`, which becomes a symlink
    /// to it.
    pub fn behind(link: &Path, size_mib: u64) -> Self {
        let mount_point = link.with_extension("tmpfs");
        std::fs::create_dir_all(&mount_point).unwrap();
        let guard = Self { mount_point };
        nix::mount::mount(
            Some("tmpfs"),
            &guard.mount_point,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size_mib}m").as_str()),
        )
        .unwrap_or_else(|e| panic!("mounting a tmpfs on {}: {e}", guard.mount_point.display()));
        std::os::unix::fs::symlink(&guard.mount_point, link).unwrap();
        guard
    }

    /// Takes every free byte with one file, which is returned.
    pub fn fill(&self) -> PathBuf {
        let filler = self.mount_point.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 16];
        loop {
            match std::io::Write::write(&mut file, &block) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) => {
                    return filler
                }
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
    }

    /// Nothing is mounted inside the tmpfs.
    pub fn assert_holds_no_mounts(&self) {
        let inside: Vec<_> = mounts_under(&self.mount_point)
            .into_iter()
            .filter(|m| *m != self.mount_point)
            .collect();
        assert!(inside.is_empty(), "mounts left: {inside:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount_under(&self.mount_point);
        // Outside the lab's temp dir (an image dir's, under /dev/shm) the
        // mount point would stay.
        let _ = std::fs::remove_dir(&self.mount_point);
    }
}

/// The most resident memory process `pid` has had (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

/// `migrate` built with the `fault-injection` feature, in its own target dir
/// beside this one (`scripts/test.sh` builds it).
pub fn fault_injection_migrate() -> PathBuf {
    // <target>/debug/migrate -> <target>/fault-injection/debug/migrate
    let normal = bin("migrate");
    let profile = normal.parent().unwrap();
    let path = profile
        .parent()
        .unwrap()
        .join("fault-injection")
        .join(profile.file_name().unwrap())
        .join("migrate");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p migrate-src --features fault-injection \
         --target-dir target/fault-injection` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// CRIU's network lock (its `CRIU` chain) is not left in the network
/// namespace of `pid`: a resumed container must be reachable.
pub fn assert_no_network_lock(pid: u64) {
    for tool in ["iptables-save", "ip6tables-save"] {
        let rules = crate::sh(
            std::process::Command::new("nsenter")
                .arg(format!("--net=/proc/{pid}/ns/net"))
                .arg(tool),
        );
        assert!(
            !rules.contains("CRIU"),
            "CRIU's network lock is left in the container's netns:\n{rules}"
        );
    }
}

/// What a `migrate` that failed with the container resumed on the source
/// printed: exit code 1, `runs_on: source` in its JSON; returns its stderr.
pub fn failed_on_source(out: &std::process::Output) -> String {
    let err = crate::checks::stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--json printed no report ({e}): {err}"));
    assert_eq!(report["runs_on"], "source", "{report}");
    err
}
