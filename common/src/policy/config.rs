//! The baseline a received container must stay within unless the
//! destination runs with `--allow-privileged`: what `runc spec` (runc 1.1)
//! generates. Anything that gives the container more of the host than that
//! config does is listed as a [`Violation`]:
//!
//! - hooks of any kind: they run as root on the host, outside the
//!   container (the destination drops them in any case and runs only its
//!   own network hook);
//! - capabilities beyond `CAP_AUDIT_WRITE`, `CAP_KILL`,
//!   `CAP_NET_BIND_SERVICE`, in any of the five sets;
//! - sharing one of the host's pid, network, ipc, uts or mount namespaces
//!   (leaving it out), or joining any existing namespace by path; new
//!   namespaces beyond those (cgroup, user, time) only isolate more;
//! - device nodes and device cgroup rules beyond the devices runc gives
//!   every container anyway (null, zero, full, random, urandom, tty, and for
//!   rules also console, ptmx and the pts);
//! - sysctls (`runc spec` sets none), host network interfaces moved in
//!   (`netDevices`);
//! - one of `runc spec`'s masked or read-only `/proc` and `/sys` paths left
//!   open (host root in the container could write `/proc/sysrq-trigger`), a
//!   second `proc` mounted elsewhere (it would not be masked), `sysfs` or
//!   `cgroup` mounted read-write;
//! - mounts of filesystems that reach host files or devices: only proc,
//!   tmpfs, devpts, mqueue, sysfs, cgroup and cgroup2 are virtual; bind
//!   mounts are judged against `--allow-bind` (see [`super::Policy`]);
//! - a seccomp notification socket (`listenerPath`: runc connects to that
//!   host socket as root), the `org.criu.config` annotation (runc would
//!   hand CRIU a config file from that host path, and CRIU config options
//!   such as `action-script` run programs as root);
//! - scheduling above the host's processes: a negative `oomScoreAdj`, a
//!   real-time or deadline scheduler, a negative nice, real-time I/O.
//!
//! Not refused, because `runc spec` itself has them or leaves them out:
//! running as uid 0, no AppArmor profile and no seccomp filter (a profile
//! or filter named in the config only confines more), `noNewPrivileges`
//! false (the bounding set still caps what setuid binaries gain), rlimits
//! and cgroup resources.

use std::fmt;
use std::path::PathBuf;

use oci_spec::runtime::{
    Capability, IOPriorityClass, LinuxCapabilities, LinuxDeviceType, LinuxNamespaceType,
    LinuxSchedulerPolicy, Spec,
};

use crate::bundle::{is_bind, joins};

const BASE_CAPABILITIES: [Capability; 3] = [
    Capability::AuditWrite,
    Capability::Kill,
    Capability::NetBindService,
];

/// The namespaces `runc spec` creates; without one the container shares
/// the host's.
const BASE_NAMESPACES: [LinuxNamespaceType; 5] = [
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Network,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Mount,
];

pub(super) const BASE_MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

pub(super) const BASE_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Filesystems that reach no host file or device.
const VIRTUAL_FILESYSTEMS: [&str; 7] = [
    "proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2",
];

/// Character devices runc creates in every container (its default device
/// list): naming them in `linux.devices` grants nothing new.
const RUNC_DEVICES: [(i64, i64); 6] = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0)];

/// Character devices runc's default cgroup rules allow besides those: the
/// console, ptmx and every pts (minor `None`: any).
const RUNC_DEVICE_RULES: [(i64, Option<i64>); 3] = [(5, Some(1)), (5, Some(2)), (136, None)];

/// The annotation through which runc hands CRIU a config file of its own.
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// One way a received config exceeds what the destination allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    Hook {
        stage: &'static str,
        path: PathBuf,
    },
    Capability {
        capability: String,
        sets: Vec<&'static str>,
    },
    SharedNamespace {
        kind: LinuxNamespaceType,
    },
    JoinedNamespace {
        kind: LinuxNamespaceType,
        path: PathBuf,
    },
    Device {
        path: PathBuf,
        kind: String,
        major: i64,
        minor: i64,
    },
    DeviceRule {
        rule: String,
    },
    Sysctl {
        key: String,
    },
    NetDevice {
        name: String,
    },
    Unmasked {
        path: &'static str,
    },
    Writable {
        path: &'static str,
    },
    ProcElsewhere {
        destination: PathBuf,
    },
    WritableKernelFs {
        kind: String,
        destination: PathBuf,
    },
    Filesystem {
        kind: String,
        destination: PathBuf,
    },
    SeccompListener {
        path: PathBuf,
    },
    CriuConfig {
        value: String,
    },
    Scheduling {
        what: String,
    },
    RelativeBind {
        source: PathBuf,
    },
    BindOutside {
        source: PathBuf,
        allowed: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hook { stage, path } => write!(
                f,
                "hooks.{stage} would run {} as root on this host: hooks from the source never run \
                 here",
                path.display()
            ),
            Self::Capability { capability, sets } => write!(
                f,
                "capability {capability} (in {}) is more than runc spec grants (CAP_AUDIT_WRITE, \
                 CAP_KILL, CAP_NET_BIND_SERVICE)",
                sets.join(", ")
            ),
            Self::SharedNamespace { kind } => write!(
                f,
                "no {kind} namespace of its own: the container would share this host's"
            ),
            Self::JoinedNamespace { kind, path } => write!(
                f,
                "joins the existing {kind} namespace {} on this host",
                path.display()
            ),
            Self::Device {
                path,
                kind,
                major,
                minor,
            } => write!(
                f,
                "device {} ({kind} {major}:{minor}) is not one runc gives every container",
                path.display()
            ),
            Self::DeviceRule { rule } => write!(
                f,
                "device cgroup rule \"allow {rule}\" opens devices runc gives no container"
            ),
            Self::Sysctl { key } => write!(f, "sets sysctl {key} (runc spec sets none)"),
            Self::NetDevice { name } => {
                write!(
                    f,
                    "moves this host's network interface {name} into the container"
                )
            }
            Self::Unmasked { path } => {
                write!(f, "{path} is not in linux.maskedPaths (runc spec masks it)")
            }
            Self::Writable { path } => write!(
                f,
                "{path} is in neither linux.readonlyPaths nor linux.maskedPaths (runc spec makes \
                 it read-only)"
            ),
            Self::ProcElsewhere { destination } => write!(
                f,
                "mounts a second proc at {}, where maskedPaths and readonlyPaths do not apply",
                destination.display()
            ),
            Self::WritableKernelFs { kind, destination } => write!(
                f,
                "mounts {kind} at {} read-write (runc spec mounts it read-only)",
                destination.display()
            ),
            Self::Filesystem { kind, destination } => write!(
                f,
                "mounts a {kind:?} filesystem at {}: only {} and bind mounts are allowed",
                destination.display(),
                VIRTUAL_FILESYSTEMS.join(", ")
            ),
            Self::SeccompListener { path } => write!(
                f,
                "sends seccomp notifications to {} on this host (linux.seccomp.listenerPath)",
                path.display()
            ),
            Self::CriuConfig { value } => write!(
                f,
                "annotation {CRIU_CONFIG_ANNOTATION}={value:?} would have CRIU read a config file \
                 of the source's choosing on this host"
            ),
            Self::Scheduling { what } => {
                write!(f, "{what} would put it ahead of this host's processes")
            }
            Self::RelativeBind { source } => write!(
                f,
                "bind mount source {} is relative (runc would resolve it inside this destination's \
                 own directories)",
                source.display()
            ),
            Self::BindOutside { source, allowed } => write!(
                f,
                "bind mount source {} is outside the host paths containers may use ({allowed})",
                source.display()
            ),
        }?;
        let flag = match self {
            Self::RelativeBind { .. } | Self::BindOutside { .. } => {
                "--allow-bind DIR (or --allow-privileged)"
            }
            _ => "--allow-privileged",
        };
        write!(f, "; migrate-dst allows it with {flag}")
    }
}

/// Everything in `spec` beyond `runc spec`'s baseline, bind mounts apart.
pub fn beyond_baseline(spec: &Spec) -> Vec<Violation> {
    let mut found = Vec::new();
    hooks(spec, &mut found);
    process(spec, &mut found);
    linux(spec, &mut found);
    mounts(spec, &mut found);
    if let Some(value) = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(CRIU_CONFIG_ANNOTATION))
    {
        found.push(Violation::CriuConfig {
            value: value.clone(),
        });
    }
    found
}

fn hooks(spec: &Spec, found: &mut Vec<Violation>) {
    let Some(hooks) = spec.hooks() else { return };
    // Deprecated in the spec, still run by runc: it has to be seen.
    #[allow(deprecated)]
    let prestart = hooks.prestart();
    for (stage, list) in [
        ("prestart", prestart),
        ("createRuntime", hooks.create_runtime()),
        ("createContainer", hooks.create_container()),
        ("startContainer", hooks.start_container()),
        ("poststart", hooks.poststart()),
        ("poststop", hooks.poststop()),
    ] {
        for hook in list.iter().flatten() {
            found.push(Violation::Hook {
                stage,
                path: hook.path().clone(),
            });
        }
    }
}

fn process(spec: &Spec, found: &mut Vec<Violation>) {
    let Some(process) = spec.process() else {
        return;
    };
    if let Some(caps) = process.capabilities() {
        capabilities(caps, found);
    }
    if let Some(adj) = process.oom_score_adj().filter(|adj| *adj < 0) {
        found.push(Violation::Scheduling {
            what: format!("oomScoreAdj {adj}"),
        });
    }
    if let Some(scheduler) = process.scheduler() {
        let policy = scheduler.policy();
        if matches!(
            policy,
            LinuxSchedulerPolicy::SchedFifo
                | LinuxSchedulerPolicy::SchedRr
                | LinuxSchedulerPolicy::SchedDeadline
        ) {
            found.push(Violation::Scheduling {
                what: format!("scheduler policy {policy}"),
            });
        }
        if let Some(nice) = scheduler.nice().filter(|n| *n < 0) {
            found.push(Violation::Scheduling {
                what: format!("nice {nice}"),
            });
        }
    }
    if let Some(io) = process
        .io_priority()
        .filter(|io| io.class() == IOPriorityClass::IoprioClassRt)
    {
        found.push(Violation::Scheduling {
            what: format!("I/O class {}", io.class()),
        });
    }
}

fn capabilities(caps: &LinuxCapabilities, found: &mut Vec<Violation>) {
    // One violation per capability, naming every set it is in.
    let mut extra: Vec<(Capability, Vec<&'static str>)> = Vec::new();
    for (set, list) in [
        ("bounding", caps.bounding()),
        ("effective", caps.effective()),
        ("inheritable", caps.inheritable()),
        ("permitted", caps.permitted()),
        ("ambient", caps.ambient()),
    ] {
        for cap in list.iter().flatten() {
            if BASE_CAPABILITIES.contains(cap) {
                continue;
            }
            match extra.iter_mut().find(|(c, _)| c == cap) {
                Some((_, sets)) => sets.push(set),
                None => extra.push((*cap, vec![set])),
            }
        }
    }
    let mut extra: Vec<_> = extra
        .into_iter()
        .map(|(cap, sets)| (format!("CAP_{cap}"), sets))
        .collect();
    // The sets are hash sets: sorted, the message is the same every time.
    extra.sort();
    found.extend(
        extra
            .into_iter()
            .map(|(capability, sets)| Violation::Capability { capability, sets }),
    );
}

fn linux(spec: &Spec, found: &mut Vec<Violation>) {
    // No linux section at all means none of its namespaces and masks.
    let linux = spec.linux().as_ref();
    let namespaces = linux
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or_default();
    for kind in BASE_NAMESPACES {
        if !namespaces.iter().any(|ns| ns.typ() == kind) {
            found.push(Violation::SharedNamespace { kind });
        }
    }
    for ns in namespaces {
        if let Some(path) = joins(ns) {
            found.push(Violation::JoinedNamespace {
                kind: ns.typ(),
                path: path.to_owned(),
            });
        }
    }

    let masked = linux
        .and_then(|l| l.masked_paths().as_deref())
        .unwrap_or_default();
    let readonly = linux
        .and_then(|l| l.readonly_paths().as_deref())
        .unwrap_or_default();
    let listed = |list: &[String], path: &str| list.iter().any(|p| p == path);
    for path in BASE_MASKED_PATHS {
        if !listed(masked, path) {
            found.push(Violation::Unmasked { path });
        }
    }
    for path in BASE_READONLY_PATHS {
        if !listed(readonly, path) && !listed(masked, path) {
            found.push(Violation::Writable { path });
        }
    }

    let Some(linux) = linux else { return };
    for device in linux.devices().iter().flatten() {
        let (kind, major, minor) = (device.typ(), device.major(), device.minor());
        if kind != LinuxDeviceType::C || !RUNC_DEVICES.contains(&(major, minor)) {
            found.push(Violation::Device {
                path: device.path().clone(),
                kind: kind.as_str().to_owned(),
                major,
                minor,
            });
        }
    }
    let rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_ref());
    for rule in rules.into_iter().flatten().filter(|r| r.allow()) {
        let runc_gives = rule.typ() == Some(LinuxDeviceType::C)
            && rule.major().is_some_and(|major| {
                RUNC_DEVICES.contains(&(major, rule.minor().unwrap_or(-1)))
                    || RUNC_DEVICE_RULES.contains(&(major, rule.minor()))
            });
        if !runc_gives {
            found.push(Violation::DeviceRule {
                rule: rule.to_string(),
            });
        }
    }

    let mut keys: Vec<_> = linux.sysctl().iter().flatten().map(|(k, _)| k).collect();
    keys.sort();
    found.extend(
        keys.into_iter()
            .map(|key| Violation::Sysctl { key: key.clone() }),
    );
    let mut names: Vec<_> = linux
        .net_devices()
        .iter()
        .flatten()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    found.extend(
        names
            .into_iter()
            .map(|name| Violation::NetDevice { name: name.clone() }),
    );

    if let Some(path) = linux
        .seccomp()
        .as_ref()
        .and_then(|s| s.listener_path().as_ref())
    {
        found.push(Violation::SeccompListener { path: path.clone() });
    }
}

fn mounts(spec: &Spec, found: &mut Vec<Violation>) {
    for mount in spec.mounts().iter().flatten() {
        // Bind mounts are judged against --allow-bind.
        if is_bind(mount) {
            continue;
        }
        let options = mount.options().as_deref().unwrap_or_default();
        let kind = mount.typ().clone().unwrap_or_default();
        let destination = mount.destination().clone();
        match kind.as_str() {
            "proc" if destination != std::path::Path::new("/proc") => {
                found.push(Violation::ProcElsewhere { destination })
            }
            "sysfs" | "cgroup" | "cgroup2" if !options.iter().any(|o| o == "ro") => {
                found.push(Violation::WritableKernelFs { kind, destination })
            }
            k if VIRTUAL_FILESYSTEMS.contains(&k) => {}
            _ => found.push(Violation::Filesystem { kind, destination }),
        }
    }
}
