//! Phase 1: find the container and everything the migration will move: its
//! runc state, bundle config, overlay rootfs and layers, and size estimates.
//! Nothing here changes the container.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use migrate_common::bundle::BundleConfig;
use migrate_common::protocol::LayerInfo;
use migrate_common::rootfs::{digest::layer_digest, tree_size, OverlayMount};
use migrate_common::runc::{ContainerState, Runc};

use crate::stopped::stopped_tasks;

/// Everything known about the container before it is touched.
#[derive(Debug)]
pub struct Container {
    pub state: ContainerState,
    pub config_json: String,
    pub overlay: OverlayMount,
    /// Lower layers, uppermost first, with their digests.
    pub layers: Vec<Layer>,
    pub upper_bytes: u64,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    pub info: LayerInfo,
}

pub fn inspect(runc: &Runc, id: &str) -> Result<Container> {
    let state = runc.state(id)?;
    if !state.is_running() {
        bail!(
            "container {id} is {}, not running: only running containers can be live-migrated",
            state.status
        );
    }
    let config_path = state.bundle.join("config.json");
    let config_json = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading the container's config {}", config_path.display()))?;
    let config = BundleConfig::parse(&config_json)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    if config.uses_terminal() {
        bail!("container {id} has a terminal (process.terminal=true); CRIU cannot move its tty between hosts");
    }
    check_stdio(state.pid)?;
    check_stopped(id, state.pid)?;

    let rootfs = config.root_path(&state.bundle)?;
    let overlay = OverlayMount::find(&rootfs)?;
    let layers = overlay
        .lowers
        .iter()
        .map(|path| {
            let digest = layer_digest(path)
                .with_context(|| format!("computing the digest of layer {}", path.display()))?;
            let size_bytes =
                tree_size(path).with_context(|| format!("measuring layer {}", path.display()))?;
            Ok(Layer {
                path: path.clone(),
                info: LayerInfo {
                    digest: digest.to_string(),
                    size_bytes,
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let upper_bytes = tree_size(&overlay.upper)
        .with_context(|| format!("measuring upper dir {}", overlay.upper.display()))?;
    let memory_bytes = cgroup_memory_bytes(state.pid).unwrap_or(0);
    Ok(Container {
        state,
        config_json,
        overlay,
        layers,
        upper_bytes,
        memory_bytes,
    })
}

/// What one of the init process's standard descriptors points at.
#[derive(Debug, PartialEq, Eq)]
pub enum StdioTarget {
    /// Pipes, sockets, /dev/null and anonymous inodes: CRIU handles these
    /// (runc re-plumbs pipes at restore).
    Movable,
    /// A terminal: needs a tty that exists on the destination.
    Terminal(String),
    /// A file on the host: CRIU fails with "Can't lookup mount ... for fd".
    HostFile(String),
}

pub fn classify_stdio(link: &str) -> StdioTarget {
    if link.starts_with("pipe:")
        || link.starts_with("socket:")
        || link.starts_with("anon_inode:")
        || link == "/dev/null"
    {
        StdioTarget::Movable
    } else if link.starts_with("/dev/pts/")
        || link.starts_with("/dev/tty")
        || link == "/dev/console"
    {
        StdioTarget::Terminal(link.to_owned())
    } else {
        StdioTarget::HostFile(link.to_owned())
    }
}

fn check_stdio(pid: u32) -> Result<()> {
    for (fd, name) in [(0, "stdin"), (1, "stdout"), (2, "stderr")] {
        let path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
        let Ok(target) = std::fs::read_link(&path) else {
            continue; // closed descriptor: nothing to move
        };
        match classify_stdio(&target.to_string_lossy()) {
            StdioTarget::Movable => {}
            StdioTarget::Terminal(t) => bail!(
                "the container's {name} is the terminal {t}; CRIU cannot move it: start the container with \
                 its stdio on pipes or /dev/null"
            ),
            StdioTarget::HostFile(f) => bail!(
                "the container's {name} is the host file {f}; CRIU cannot checkpoint a descriptor on a file \
                 outside the container's mounts: start the container with its stdio on pipes (a logging shim) \
                 or /dev/null"
            ),
        }
    }
    Ok(())
}

/// Refuses a container with a stopped task: `runc checkpoint` would hang on
/// it, with the container frozen.
fn check_stopped(id: &str, pid: u32) -> Result<()> {
    let stopped = stopped_tasks(pid)
        .with_context(|| format!("looking for stopped tasks in container {id}"))?;
    if stopped.is_empty() {
        return Ok(());
    }
    let list = stopped
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let pids = stopped
        .iter()
        .map(|t| t.pid.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    bail!(
        "container {id} has stopped tasks, which CRIU cannot checkpoint (runc checkpoint would \
         hang): {list}. Nothing was frozen. Continue them (`kill -CONT {pids}` on this host, or \
         detach the debugger) and migrate again"
    )
}

/// Memory charged to the container's cgroup, an upper bound on its page
/// images (cgroup v2 `memory.current`, v1 `memory.usage_in_bytes`).
fn cgroup_memory_bytes(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let (file, dir) = memory_cgroup_file(&cgroups)?;
    std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(dir).join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Which file under /sys/fs/cgroup holds the memory usage for a
/// /proc/PID/cgroup text: (file name, directory relative to /sys/fs/cgroup).
pub fn memory_cgroup_file(proc_cgroup: &str) -> Option<(&'static str, String)> {
    let mut unified = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return Some(("memory.usage_in_bytes", format!("memory/{path}")));
        }
        if controllers.is_empty() {
            unified = Some(("memory.current", path.to_owned()));
        }
    }
    unified
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn classifies_stdio() {
        assert_eq!(classify_stdio("pipe:[1234]"), StdioTarget::Movable);
        assert_eq!(classify_stdio("/dev/null"), StdioTarget::Movable);
        assert_eq!(classify_stdio("socket:[9]"), StdioTarget::Movable);
        assert_eq!(
            classify_stdio("/dev/pts/3"),
            StdioTarget::Terminal("/dev/pts/3".into())
        );
        assert_eq!(
            classify_stdio("/var/log/app.log"),
            StdioTarget::HostFile("/var/log/app.log".into())
        );
    }

    #[test]
    fn finds_memory_cgroup_v1_and_v2() {
        let v1 = "12:freezer:/m/c1\n7:memory:/m/c1\n1:name=systemd:/m/c1\n0::/\n";
        assert_eq!(
            memory_cgroup_file(v1).unwrap(),
            ("memory.usage_in_bytes", "memory/m/c1".to_owned())
        );
        let v2 = "0::/system.slice/c1\n";
        assert_eq!(
            memory_cgroup_file(v2).unwrap(),
            ("memory.current", "system.slice/c1".to_owned())
        );
    }
}
