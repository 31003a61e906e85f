//! The preflight's items: the record each check leaves ([`Verdict`]), and
//! the checks that read this host (cgroups, bind sources, lazy pages,
//! memory, disk) as functions of what they read, tested without root.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use migrate_common::bundle::BundleConfig;
use migrate_common::criu::{ensure_pipe_max_size, PipeMaxSize};
use migrate_common::policy::Policy;
use migrate_common::protocol::PreflightCheck;

use crate::Daemon;

/// The items so far, in the order the checks ran; the refusals are the
/// failed items' reasons, one each (an item may fail for several).
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    items: Vec<PreflightCheck>,
    refusals: Vec<String>,
}

impl Verdict {
    pub(crate) fn pass(&mut self, name: &str, detail: impl Into<String>) {
        self.items.push(PreflightCheck {
            name: name.to_owned(),
            ok: true,
            detail: detail.into(),
        });
    }

    pub(crate) fn fail(&mut self, name: &str, reason: impl Into<String>) {
        self.fail_all(name, vec![reason.into()]);
    }

    /// A failed item whose detail is all of `reasons`.
    pub(crate) fn fail_all(&mut self, name: &str, reasons: Vec<String>) {
        self.items.push(PreflightCheck {
            name: name.to_owned(),
            ok: false,
            detail: reasons.join("; "),
        });
        self.refusals.extend(reasons);
    }

    /// Passed with `detail` when there are no `reasons`, else failed.
    pub(crate) fn record(&mut self, name: &str, outcome: Result<String, Vec<String>>) {
        match outcome {
            Ok(detail) => self.pass(name, detail),
            Err(reasons) => self.fail_all(name, reasons),
        }
    }

    pub(crate) fn accepted(&self) -> bool {
        self.refusals.is_empty()
    }

    pub(crate) fn into_parts(self) -> (Vec<PreflightCheck>, Vec<String>) {
        (self.items, self.refusals)
    }
}

/// Where cgroup v2 is mounted.
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup the restored container gets, as runc's cgroupfs driver names
/// it: under `--cgroup-parent` when set (as the config is rewritten), else
/// the config's cgroupsPath; without one, or with a relative one, under
/// runc's own cgroup, which is this daemon's. `Ok(None)`: the systemd
/// driver's `slice:prefix:name`, which systemd places.
pub(crate) fn container_cgroup(
    cgroup_parent: Option<&str>,
    config: &BundleConfig,
    id: &str,
) -> Result<Option<String>, String> {
    let current = config.cgroups_path().unwrap_or_default();
    if current.contains(':') {
        return match cgroup_parent {
            Some(_) => Err(format!(
                "cgroupsPath {current:?} uses the systemd driver's slice:prefix:name form; \
                 --cgroup-parent supports cgroupfs paths only"
            )),
            None => Ok(None),
        };
    }
    let path = match cgroup_parent {
        Some(parent) => {
            let leaf = Path::new(current)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| id.to_owned());
            format!("{}/{leaf}", parent.trim_end_matches('/'))
        }
        None if current.is_empty() => id.to_owned(),
        None => current.to_owned(),
    };
    if path.starts_with('/') {
        return Ok(Some(path));
    }
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| own_cgroup(&text))
        .ok_or("cannot read this daemon's own cgroup from /proc/self/cgroup")?;
    Ok(Some(format!("{}/{path}", own.trim_end_matches('/'))))
}

/// The cgroup v2 path in a /proc/self/cgroup text; on a v1-only host, the
/// first hierarchy's (a daemon is in the same path in each, as systemd
/// places it).
fn own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| text.lines().next()?.splitn(3, ':').nth(2))
        .map(str::to_owned)
}

/// The cgroup v2 controllers the config's resources need.
pub(crate) fn needed_controllers(config: &BundleConfig) -> Vec<String> {
    let mut needed = Vec::new();
    let Some(resources) = config
        .spec()
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
    else {
        return needed;
    };
    let mut need = |name: &str| {
        if !needed.iter().any(|n| n == name) {
            needed.push(name.to_owned());
        }
    };
    if let Some(memory) = resources.memory() {
        if memory.limit().is_some() || memory.reservation().is_some() || memory.swap().is_some() {
            need("memory");
        }
    }
    if let Some(cpu) = resources.cpu() {
        if cpu.shares().is_some()
            || cpu.quota().is_some()
            || cpu.period().is_some()
            || cpu.burst().is_some()
            || cpu.idle().is_some()
        {
            need("cpu");
        }
        if cpu.cpus().as_deref().is_some_and(|c| !c.is_empty())
            || cpu.mems().as_deref().is_some_and(|m| !m.is_empty())
        {
            need("cpuset");
        }
    }
    if resources.pids().is_some() {
        need("pids");
    }
    if resources.block_io().is_some() {
        need("io");
    }
    if resources
        .hugepage_limits()
        .as_ref()
        .is_some_and(|h| !h.is_empty())
    {
        need("hugetlb");
    }
    for key in resources.unified().iter().flat_map(|u| u.keys()) {
        match key.split_once('.') {
            Some(("cgroup", _)) | None => {}
            Some((controller, _)) => need(controller),
        }
    }
    needed
}

/// Whether runc can create `cgroup` with the `needed` controllers under
/// `root`, where cgroup v2 or the v1 hierarchies are mounted, and no
/// process already runs in it.
pub(crate) fn cgroup_setup(root: &Path, cgroup: &str, needed: &[String]) -> Result<String, String> {
    let relative = cgroup.trim_start_matches('/');
    if root.join("cgroup.controllers").exists() {
        return v2_setup(root, relative, needed);
    }
    let hierarchies: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    if hierarchies.is_empty() {
        return Err(format!(
            "no cgroup hierarchy is mounted at {}: runc cannot create the container's cgroup",
            root.display()
        ));
    }
    v1_setup(root, relative, needed)
}

/// cgroup v2: the parent exists with the controllers enabled for its
/// children or available to enable, or the nearest existing ancestor is
/// writable and has them available (runc creates the rest and enables them
/// on the way).
fn v2_setup(root: &Path, relative: &str, needed: &[String]) -> Result<String, String> {
    let own = root.join(relative);
    busy(&own)?;
    let parent = own.parent().unwrap_or(root).to_owned();
    let existing = nearest_existing(&parent, root);
    let listed = |file: &str| -> Vec<String> {
        std::fs::read_to_string(existing.join(file))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let available = listed("cgroup.controllers");
    let enabled = listed("cgroup.subtree_control");
    let missing: Vec<&str> = needed
        .iter()
        .filter(|c| !available.contains(c) && !enabled.contains(c))
        .map(String::as_str)
        .collect();
    let mut reasons = Vec::new();
    if !missing.is_empty() {
        reasons.push(format!(
            "the container's resources need the {} controller(s), which {} does not offer \
             (cgroup.controllers: {})",
            missing.join(", "),
            existing.display(),
            if available.is_empty() {
                "none".to_owned()
            } else {
                available.join(" ")
            }
        ));
    }
    reasons.extend(unwritable(&parent, &existing));
    if !reasons.is_empty() {
        return Err(reasons.join("; "));
    }
    let controllers = if needed.is_empty() {
        "no controller needed".to_owned()
    } else {
        format!("controllers {} available", needed.join(", "))
    };
    Ok(if existing != parent {
        format!(
            "cgroup v2: {} can be created under {} ({controllers})",
            own.display(),
            existing.display()
        )
    } else {
        format!(
            "cgroup v2: {} can be created ({controllers})",
            own.display()
        )
    })
}

/// cgroup v1: every needed controller has its hierarchy mounted, where the
/// cgroup is free and its parent exists or can be created.
fn v1_setup(root: &Path, relative: &str, needed: &[String]) -> Result<String, String> {
    let mut reasons = Vec::new();
    for controller in needed {
        let hierarchy = root.join(controller);
        if !hierarchy.join("cgroup.procs").exists() {
            reasons.push(format!(
                "the container's resources need the {controller} controller, and no cgroup v1 \
                 hierarchy of it is mounted at {}",
                hierarchy.display()
            ));
            continue;
        }
        let own = hierarchy.join(relative);
        if let Err(reason) = busy(&own) {
            reasons.push(reason);
        }
        let parent = own.parent().unwrap_or(&hierarchy).to_owned();
        reasons.extend(unwritable(&parent, &nearest_existing(&parent, &hierarchy)));
    }
    if !reasons.is_empty() {
        return Err(reasons.join("; "));
    }
    Ok(if needed.is_empty() {
        format!("cgroup v1: /{relative} needs no controller")
    } else {
        format!(
            "cgroup v1: /{relative} can be created in the {} hierarchies",
            needed.join(", ")
        )
    })
}

/// Refuses a cgroup that exists with processes in it: the restored
/// container would share it.
fn busy(cgroup: &Path) -> Result<(), String> {
    if std::fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty()) {
        return Err(format!(
            "cgroup {} already exists on this host with processes in it",
            cgroup.display()
        ));
    }
    Ok(())
}

/// `dir` or its nearest ancestor that exists, no higher than `root`.
fn nearest_existing(dir: &Path, root: &Path) -> PathBuf {
    let mut existing = dir.to_owned();
    while !existing.is_dir() && existing != root {
        existing = existing.parent().unwrap_or(root).to_owned();
    }
    existing
}

/// Why runc could not create `parent` below `existing`, if it could not.
fn unwritable(parent: &Path, existing: &Path) -> Option<String> {
    (existing != parent && nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK).is_err())
        .then(|| {
            format!(
                "{} does not exist and {} is not writable, so runc cannot create it",
                parent.display(),
                existing.display()
            )
        })
}

/// Bind sources the policy allows by their text that this host cannot
/// give: missing, or resolving through a symlink outside the allowance.
/// Both get one message, so that no answer tells a source whether a path
/// outside the allowance exists; paths outside it are never looked up
/// ([`Policy::check`] refuses them by their text). With
/// `--allow-privileged` every path is allowed, and only existence counts.
pub(crate) fn unusable_bind_sources(policy: &Policy, config: &BundleConfig) -> Vec<String> {
    let mut unusable = Vec::new();
    for source in config.bind_mount_sources() {
        let usable = if policy.privileged() {
            source.exists()
        } else if policy.bind_allowed(&source) {
            resolves_inside(policy, &source)
        } else {
            continue;
        };
        if !usable {
            unusable.push(format!(
                "bind mount source {} does not exist on this host or leads outside the host \
                 paths containers may use ({})",
                source.display(),
                policy.bind_roots_text()
            ));
        }
    }
    unusable
}

/// What the bind sources check found when every source it looked up is
/// usable.
pub(crate) fn bind_sources_found(policy: &Policy, config: &BundleConfig) -> String {
    let sources = config.bind_mount_sources();
    let outside = sources
        .iter()
        .filter(|s| !policy.privileged() && !policy.bind_allowed(s))
        .count();
    match (sources.len() - outside, outside) {
        (0, 0) => "no bind mount".into(),
        (here, 0) => format!("{here} bind mount source(s), all here"),
        (here, outside) => format!(
            "{here} bind mount source(s) here; {outside} outside the allowance, not looked up \
             (see policy)"
        ),
    }
}

fn resolves_inside(policy: &Policy, source: &Path) -> bool {
    std::fs::canonicalize(source).is_ok_and(|real| policy.bind_allowed(&real))
}

/// Whether a lazy restore can work here: userfaultfd with the events CRIU
/// needs, and pipes large enough for its page transfer (raised when they are
/// not, which needs root).
pub(crate) fn lazy_pages(daemon: &Daemon) -> Result<(), String> {
    if !daemon.criu.supports_lazy_pages() {
        return Err("criu check --feature uffd-noncoop fails (no userfaultfd)".into());
    }
    match ensure_pipe_max_size() {
        Ok(PipeMaxSize::Enough(_)) => Ok(()),
        Ok(PipeMaxSize::Raised { from, to }) => {
            tracing::info!(
                from,
                to,
                "raised fs.pipe-max-size: CRIU's lazy page transfer needs it"
            );
            Ok(())
        }
        Err(e) => Err(format!("{e:#}")),
    }
}

pub(crate) fn mem_available() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    parse_mem_available(&meminfo).context("no MemAvailable line in /proc/meminfo")
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

pub(crate) fn free_bytes(dir: &Path) -> nix::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo =
            "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots\n"), None);
        assert_eq!(
            parse_mem_available("MemAvailable: 18446744073709551615 kB\n"),
            None
        );
    }

    #[test]
    fn failed_items_give_the_refusals() {
        let mut verdict = Verdict::default();
        verdict.pass("protocol", "version 4");
        verdict.fail_all("policy", vec!["a hook".into(), "a device".into()]);
        verdict.record("disk", Ok("room".into()));
        assert!(!verdict.accepted());
        let (items, refusals) = verdict.into_parts();
        let names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["protocol", "policy", "disk"]);
        assert!(items[0].ok && !items[1].ok && items[2].ok);
        assert_eq!(items[1].detail, "a hook; a device");
        assert_eq!(refusals, ["a hook", "a device"]);
    }

    fn config(resources: serde_json::Value, cgroups_path: Option<&str>) -> BundleConfig {
        let mut linux = serde_json::json!({ "resources": resources });
        if let Some(path) = cgroups_path {
            linux["cgroupsPath"] = path.into();
        }
        BundleConfig::parse(
            &serde_json::json!({ "ociVersion": "1.0.2", "linux": linux }).to_string(),
        )
        .unwrap()
    }

    #[test]
    fn controllers_come_from_the_resources() {
        let none = config(
            serde_json::json!({"devices": [{"allow": false, "access": "rwm"}]}),
            None,
        );
        assert!(needed_controllers(&none).is_empty());
        let some = config(
            serde_json::json!({
                "memory": {"limit": 1_000_000},
                "cpu": {"quota": 50_000, "cpus": "0"},
                "pids": {"limit": 100},
                "unified": {"memory.high": "900000", "cgroup.freeze": "0"}
            }),
            None,
        );
        assert_eq!(
            needed_controllers(&some),
            ["memory", "cpu", "cpuset", "pids"]
        );
    }

    #[test]
    fn the_cgroup_is_named_as_runc_would() {
        let plain = config(serde_json::json!({}), Some("/tenant/web1"));
        assert_eq!(
            container_cgroup(None, &plain, "web1").unwrap().as_deref(),
            Some("/tenant/web1")
        );
        assert_eq!(
            container_cgroup(Some("/migrate/"), &plain, "web1")
                .unwrap()
                .as_deref(),
            Some("/migrate/web1")
        );
        let bare = config(serde_json::json!({}), None);
        assert_eq!(
            container_cgroup(Some("/migrate"), &bare, "c2")
                .unwrap()
                .as_deref(),
            Some("/migrate/c2")
        );
        let systemd = config(serde_json::json!({}), Some("system.slice:runc:web1"));
        assert_eq!(container_cgroup(None, &systemd, "web1").unwrap(), None);
        assert!(container_cgroup(Some("/migrate"), &systemd, "web1").is_err());
        assert_eq!(
            own_cgroup("2:cpu:/a\n1:name=systemd:/a\n").as_deref(),
            Some("/a")
        );
        assert_eq!(
            own_cgroup("0::/system.slice/migrate-dst.service\n").as_deref(),
            Some("/system.slice/migrate-dst.service")
        );
    }

    #[test]
    fn cgroup_setup_on_v2_needs_the_controllers_and_a_free_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let nothing = cgroup_setup(root, "/migrate/web1", &[]).unwrap_err();
        assert!(nothing.contains("no cgroup hierarchy"), "{nothing}");

        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "memory\n").unwrap();
        let created =
            cgroup_setup(root, "/migrate/web1", &["memory".into(), "pids".into()]).unwrap();
        assert!(created.contains("can be created under"), "{created}");

        let missing = cgroup_setup(root, "/migrate/web1", &["hugetlb".into()]).unwrap_err();
        assert!(missing.contains("hugetlb controller"), "{missing}");

        std::fs::create_dir_all(root.join("migrate/web1")).unwrap();
        std::fs::write(root.join("migrate/cgroup.controllers"), "memory\n").unwrap();
        std::fs::write(root.join("migrate/cgroup.subtree_control"), "").unwrap();
        let there = cgroup_setup(root, "/migrate/web1", &["memory".into()]).unwrap();
        assert!(
            there.ends_with("can be created (controllers memory available)"),
            "{there}"
        );
        let not_offered = cgroup_setup(root, "/migrate/web1", &["pids".into()]).unwrap_err();
        assert!(not_offered.contains("pids"), "{not_offered}");

        std::fs::write(root.join("migrate/web1/cgroup.procs"), "4242\n").unwrap();
        let busy = cgroup_setup(root, "/migrate/web1", &[]).unwrap_err();
        assert!(busy.contains("with processes in it"), "{busy}");
    }

    #[test]
    fn cgroup_setup_on_v1_needs_the_hierarchies() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        for hierarchy in ["memory", "freezer"] {
            std::fs::create_dir_all(root.join(hierarchy)).unwrap();
            std::fs::write(root.join(hierarchy).join("cgroup.procs"), "1\n").unwrap();
        }
        let none = cgroup_setup(root, "/migrate/web1", &[]).unwrap();
        assert!(none.contains("needs no controller"), "{none}");
        let memory = cgroup_setup(root, "/migrate/web1", &["memory".into()]).unwrap();
        assert!(memory.contains("memory hierarchies"), "{memory}");
        let pids = cgroup_setup(root, "/migrate/web1", &["pids".into()]).unwrap_err();
        assert!(pids.contains("pids controller"), "{pids}");
        std::fs::create_dir_all(root.join("memory/migrate/web1")).unwrap();
        std::fs::write(root.join("memory/migrate/web1/cgroup.procs"), "4242\n").unwrap();
        let busy = cgroup_setup(root, "/migrate/web1", &["memory".into()]).unwrap_err();
        assert!(busy.contains("with processes in it"), "{busy}");
    }
}
