//! The per-migration CRIU configuration file.
//!
//! runc drives CRIU itself (`runc checkpoint`/`restore` start `criu swrk`)
//! and offers only some of CRIU's options; the rest go through a file named
//! by the `CRIU_CONFIG_FILE` environment variable, which CRIU reads at
//! start-up in every mode, RPC included, before applying runc's own options.
//! That keeps the operator's `/etc/criu/runc.conf` untouched and confines our
//! options to the one checkpoint or restore we start.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::CriuError;

/// The options migrate adds to a CRIU run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFile {
    /// Script CRIU runs at each action (pre-dump, post-dump, ...).
    pub action_script: Option<PathBuf>,
    /// Bytes of deleted-but-mapped files CRIU may copy into the images.
    pub ghost_limit: Option<u64>,
    /// An inherited, connected socket to use as the page-server connection
    /// instead of a TCP listener or a TCP connection: a lazy dump serves its
    /// pages on it. runc's `--page-server` only takes an address, and a TCP
    /// listener would hand the container's memory to any local process that
    /// connects first.
    pub ps_socket: Option<RawFd>,
    /// Where a restore places the container's cgroups. runc sets this for
    /// cgroup v1 only; on cgroup v2 hosts CRIU would otherwise put the
    /// restored processes back under the cgroup path they were dumped from.
    pub cgroup_root: Option<String>,
    /// Dump: leave connections in a listener's accept queue behind instead
    /// of refusing to dump (runc has no flag for it).
    pub skip_in_flight: bool,
    /// Restore: established TCP connections come back closed.
    pub tcp_close: bool,
    /// Dump: link files open under a removed name back into the rootfs.
    pub link_remap: bool,
}

impl ConfigFile {
    /// The file's text: CRIU's config syntax, one long option per line
    /// without the leading dashes.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Some(script) = &self.action_script {
            text.push_str(&format!("action-script {}\n", script.display()));
        }
        if let Some(limit) = self.ghost_limit {
            text.push_str(&format!("ghost-limit {limit}\n"));
        }
        if let Some(fd) = self.ps_socket {
            text.push_str(&format!("ps-socket {fd}\n"));
        }
        if let Some(root) = &self.cgroup_root {
            text.push_str(&format!("cgroup-root {root}\n"));
        }
        for (on, option) in [
            (self.skip_in_flight, "skip-in-flight"),
            (self.tcp_close, "tcp-close"),
            (self.link_remap, "link-remap"),
        ] {
            if on {
                text.push_str(option);
                text.push('\n');
            }
        }
        text
    }

    pub fn write(&self, path: &Path) -> Result<(), CriuError> {
        std::fs::write(path, self.render()).map_err(|source| CriuError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_only_what_is_set() {
        assert_eq!(ConfigFile::default().render(), "");
        let cfg = ConfigFile {
            action_script: Some("/run/m/hook".into()),
            ghost_limit: Some(1 << 20),
            ps_socket: Some(100),
            cgroup_root: Some("/migrate/c1".into()),
            skip_in_flight: true,
            tcp_close: true,
            link_remap: true,
        };
        assert_eq!(
            cfg.render(),
            "action-script /run/m/hook\nghost-limit 1048576\nps-socket 100\ncgroup-root /migrate/c1\n\
             skip-in-flight\ntcp-close\nlink-remap\n"
        );
    }
}
