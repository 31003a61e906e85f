//! Phase 1: find the container and everything the migration will move: its
//! runc state, bundle config, overlay rootfs and layers, and size estimates.
//! Nothing here changes the container.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use migrate_common::bundle::BundleConfig;
use migrate_common::netns;
use migrate_common::protocol::{LayerInfo, NetworkIdentity};
use migrate_common::rootfs::{tree_size, OverlayMount};
use migrate_common::runc::{ContainerState, Runc};

use crate::digest_cache::DigestCache;
use crate::stopped::{stopped_tasks, StoppedTask};

/// Everything known about the container before it is touched.
#[derive(Debug)]
pub struct Container {
    pub state: ContainerState,
    pub config_json: String,
    pub overlay: OverlayMount,
    /// Lower layers, uppermost first, with their digests.
    pub layers: Vec<Layer>,
    /// How many of them were hashed, not found in the digest cache.
    pub layers_hashed: usize,
    pub upper_bytes: u64,
    pub memory_bytes: u64,
    /// Its interfaces on a bridge, for the destination to recreate; none
    /// when it has only loopback or no network namespace of its own.
    pub network: Option<NetworkIdentity>,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    pub info: LayerInfo,
}

/// Inspects container `id`; lower layers the cache knows unchanged are not
/// hashed again.
pub fn inspect(runc: &Runc, id: &str, cache: &mut DigestCache) -> Result<Container> {
    let state = runc.state(id)?;
    if let Some(blocker) = running_blocker(&state) {
        bail!("{}", blocker.explain(id));
    }
    let config_path = state.bundle.join("config.json");
    let config_json = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading the container's config {}", config_path.display()))?;
    let config = BundleConfig::parse(&config_json)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    if let Some(blocker) = terminal_blocker(&config).or_else(|| stdio_blocker(state.pid)) {
        bail!("{}", blocker.explain(id));
    }
    if let Some(blocker) = stopped_blocker(state.pid)
        .with_context(|| format!("looking for stopped tasks in container {id}"))?
    {
        bail!("{}", blocker.explain(id));
    }

    let rootfs = config.root_path(&state.bundle)?;
    let overlay = OverlayMount::find(&rootfs)?;
    let mut layers_hashed = 0;
    let layers = overlay
        .lowers
        .iter()
        .map(|path| {
            let (digest, hashed) = cache
                .digest(path)
                .with_context(|| format!("computing the digest of layer {}", path.display()))?;
            layers_hashed += usize::from(hashed);
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
    if layers_hashed > 0 {
        if let Err(e) = cache.save() {
            // Only the next migration's time depends on it.
            tracing::warn!(error = %format!("{e:#}"), "saving the layer digest cache");
        }
    }
    let upper_bytes = tree_size(&overlay.upper)
        .with_context(|| format!("measuring upper dir {}", overlay.upper.display()))?;
    let memory_bytes = cgroup_memory_bytes(state.pid).unwrap_or(0);
    // Found before anything is frozen: an interface that cannot move
    // refuses the migration here.
    let network = if config.has_private_netns() {
        netns::discover(state.pid)
            .with_context(|| format!("reading the network identity of container {id}"))?
    } else {
        None
    };
    Ok(Container {
        state,
        config_json,
        overlay,
        layers,
        layers_hashed,
        upper_bytes,
        memory_bytes,
        network,
    })
}

/// Why a container cannot be live-migrated as it is, found without
/// touching it: `inspect` refuses with [`Blocker::explain`], `migrate ps`
/// lists [`Blocker::short`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    NotRunning {
        status: String,
    },
    Terminal,
    Stdio {
        name: &'static str,
        target: StdioTarget,
    },
    Stopped(Vec<StoppedTask>),
}

impl Blocker {
    /// A few words for a listing.
    pub fn short(&self) -> String {
        match self {
            Self::NotRunning { status } => format!("{status}, not running"),
            Self::Terminal => "has a terminal (process.terminal)".to_owned(),
            Self::Stdio {
                name,
                target: StdioTarget::Terminal(t),
            } => format!("{name} is the terminal {t}"),
            Self::Stdio {
                name,
                target: StdioTarget::HostFile(f),
            } => format!("{name} is the host file {f}"),
            Self::Stdio { name, .. } => format!("{name} cannot move"),
            Self::Stopped(tasks) => format!(
                "stopped tasks: pid {}",
                tasks
                    .iter()
                    .map(|t| t.pid.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }

    /// The whole sentence, with what to do about it.
    pub fn explain(&self, id: &str) -> String {
        match self {
            Self::NotRunning { status } => format!(
                "container {id} is {status}, not running: only running containers can be live-migrated"
            ),
            Self::Terminal => format!(
                "container {id} has a terminal (process.terminal=true); CRIU cannot move its tty between hosts"
            ),
            Self::Stdio {
                name,
                target: StdioTarget::Terminal(t),
            } => format!(
                "the container's {name} is the terminal {t}; CRIU cannot move it: start the container with \
                 its stdio on pipes or /dev/null"
            ),
            Self::Stdio { name, target } => format!(
                "the container's {name} is the host file {}; CRIU cannot checkpoint a descriptor on a file \
                 outside the container's mounts: start the container with its stdio on pipes (a logging shim) \
                 or /dev/null",
                match target {
                    StdioTarget::HostFile(f) | StdioTarget::Terminal(f) => f.as_str(),
                    StdioTarget::Movable => "?",
                }
            ),
            Self::Stopped(stopped) => {
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
                format!(
                    "container {id} has stopped tasks, which CRIU cannot checkpoint (runc checkpoint would \
                     hang): {list}. Nothing was frozen. Continue them (`kill -CONT {pids}` on this host, or \
                     detach the debugger) and migrate again"
                )
            }
        }
    }
}

pub fn running_blocker(state: &ContainerState) -> Option<Blocker> {
    (!state.is_running()).then(|| Blocker::NotRunning {
        status: state.status.clone(),
    })
}

pub fn terminal_blocker(config: &BundleConfig) -> Option<Blocker> {
    config.uses_terminal().then_some(Blocker::Terminal)
}

/// What one of the init process's standard descriptors points at.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The first of the init process's standard descriptors CRIU cannot move.
pub fn stdio_blocker(pid: u32) -> Option<Blocker> {
    [(0, "stdin"), (1, "stdout"), (2, "stderr")]
        .into_iter()
        .find_map(|(fd, name)| {
            // A closed descriptor has nothing to move.
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            match classify_stdio(&target.to_string_lossy()) {
                StdioTarget::Movable => None,
                target => Some(Blocker::Stdio { name, target }),
            }
        })
}

/// A container with a stopped task: `runc checkpoint` would hang on it,
/// with the container frozen.
pub fn stopped_blocker(pid: u32) -> std::io::Result<Option<Blocker>> {
    let stopped = stopped_tasks(pid)?;
    Ok((!stopped.is_empty()).then_some(Blocker::Stopped(stopped)))
}

/// Memory charged to the container's cgroup, an upper bound on its page
/// images (cgroup v2 `memory.current`, v1 `memory.usage_in_bytes`).
pub fn cgroup_memory_bytes(pid: u32) -> Option<u64> {
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
    fn blockers_say_why_in_short_and_in_full() {
        let stopped = Blocker::Stopped(vec![StoppedTask {
            pid: 41,
            pid_in_container: Some(3),
            name: "sleep".into(),
            traced: false,
        }]);
        assert_eq!(stopped.short(), "stopped tasks: pid 41");
        assert!(stopped.explain("web").contains("kill -CONT 41"));
        let paused = Blocker::NotRunning {
            status: "paused".into(),
        };
        assert_eq!(paused.short(), "paused, not running");
        assert!(paused.explain("web").starts_with("container web is paused"));
        let tty = Blocker::Stdio {
            name: "stdout",
            target: StdioTarget::Terminal("/dev/pts/1".into()),
        };
        assert_eq!(tty.short(), "stdout is the terminal /dev/pts/1");
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
