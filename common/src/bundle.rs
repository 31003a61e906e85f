//! The container's OCI `config.json`: what the source reads from it, and how
//! the destination rewrites it for its own host. A typed
//! [`oci_spec::runtime::Spec`], so that what the destination checks
//! ([`crate::policy`]) and what it hands to runc are the same fields; pure
//! functions, tested without root.
//!
//! Parsing drops fields the runtime spec does not define, so only fields
//! the destination's policy knows about reach its runc.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Hook as OciHook, Hooks, LinuxNamespace, LinuxNamespaceType, Mount, Spec};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("config.json is not a valid OCI runtime config")]
    Json(#[from] serde_json::Error),
    #[error("config.json has no {0}")]
    Missing(&'static str),
    #[error("config.json: {0}")]
    Unsupported(String),
}

/// A hook the destination adds, as OCI defines one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// What the destination changes in the config.
#[derive(Debug, Clone)]
pub struct DestinationRewrite {
    pub container_id: String,
    /// Where the destination mounted the rebuilt overlay.
    pub rootfs: PathBuf,
    /// Cgroup parent for the restored container (cgroupfs path such as
    /// `/migrate`), or `None` to keep the source's cgroupsPath.
    pub cgroup_parent: Option<String>,
    /// Added to `createRuntime` when the container has its own network
    /// namespace: runc checkpoints it without its network state, and this
    /// brings the restored namespace's loopback up before processes resume.
    pub network_hook: Option<Hook>,
}

/// A mount whose source is a path on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: PathBuf,
}

#[derive(Debug, Clone)]
pub struct BundleConfig {
    spec: Spec,
}

impl BundleConfig {
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        // Through a Value first: serde would also read a struct from a JSON
        // array, field by field, and an array is no config.
        let value: serde_json::Value = serde_json::from_str(text)?;
        if !value.is_object() {
            return Err(BundleError::Unsupported(
                "top level is not an object".into(),
            ));
        }
        Ok(Self {
            spec: serde_json::from_value(value)?,
        })
    }

    pub fn to_json(&self) -> String {
        // A Spec always serialises: its maps are keyed by strings and none
        // of its types has a fallible Serialize.
        serde_json::to_string_pretty(&self.spec).unwrap_or_default()
    }

    /// The config as the runtime spec types it, for checks beyond what
    /// the methods here answer.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// `root.path`, resolved against the bundle directory when relative.
    pub fn root_path(&self, bundle: &Path) -> Result<PathBuf, BundleError> {
        match self.spec.root() {
            Some(root) if !root.path().as_os_str().is_empty() => Ok(bundle.join(root.path())),
            _ => Err(BundleError::Missing("root.path")),
        }
    }

    /// `linux.cgroupsPath`, when set.
    pub fn cgroups_path(&self) -> Option<&str> {
        self.spec
            .linux()
            .as_ref()?
            .cgroups_path()
            .as_ref()?
            .to_str()
    }

    pub fn uses_terminal(&self) -> bool {
        self.spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false)
    }

    /// Whether the container gets a network namespace of its own (one listed
    /// without a `path` to join).
    pub fn has_private_netns(&self) -> bool {
        self.namespaces()
            .any(|ns| ns.typ() == LinuxNamespaceType::Network && joins(ns).is_none())
    }

    /// The namespaces `linux.namespaces` lists.
    pub fn namespaces(&self) -> impl Iterator<Item = &LinuxNamespace> {
        self.spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .into_iter()
            .flatten()
    }

    /// Host paths bind-mounted into the container: they must exist on the
    /// destination too.
    pub fn bind_mount_sources(&self) -> Vec<PathBuf> {
        self.bind_mounts()
            .into_iter()
            .map(|m| m.source)
            .filter(|p| p.is_absolute())
            .collect()
    }

    /// Every bind mount, relative sources included (runc resolves those
    /// against the bundle directory).
    pub fn bind_mounts(&self) -> Vec<BindMount> {
        self.mounts()
            .filter(|m| is_bind(m))
            .filter_map(|m| {
                Some(BindMount {
                    source: m.source().clone()?,
                    destination: m.destination().clone(),
                })
            })
            .collect()
    }

    pub fn mounts(&self) -> impl Iterator<Item = &Mount> {
        self.spec.mounts().as_ref().into_iter().flatten()
    }

    /// Points the config at this host's rootfs and cgroup, and replaces
    /// every hook with the destination's own: hooks run as root on the host,
    /// outside the container, so none may come from the wire.
    pub fn rewrite_for_destination(&mut self, rw: &DestinationRewrite) -> Result<(), BundleError> {
        let private_netns = self.has_private_netns();
        let root = self
            .spec
            .root_mut()
            .as_mut()
            .ok_or(BundleError::Missing("root"))?;
        root.set_path(rw.rootfs.clone());

        if let Some(parent) = &rw.cgroup_parent {
            let current = self.cgroups_path().unwrap_or_default();
            if current.contains(':') {
                return Err(BundleError::Unsupported(format!(
                    "cgroupsPath {current:?} uses the systemd driver's slice:prefix:name form; \
                     --cgroup-parent supports cgroupfs paths only"
                )));
            }
            let parent = parent.trim_end_matches('/');
            let leaf = Path::new(current)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| rw.container_id.clone());
            let linux = self
                .spec
                .linux_mut()
                .as_mut()
                .ok_or(BundleError::Missing("linux"))?;
            linux.set_cgroups_path(Some(PathBuf::from(format!("{parent}/{leaf}"))));
        }

        let mut hooks = Hooks::default();
        if let Some(hook) = rw.network_hook.as_ref().filter(|_| private_netns) {
            let mut added = OciHook::default();
            added.set_path(hook.path.clone());
            added.set_args(Some(hook.args.clone()));
            hooks.set_create_runtime(Some(vec![added]));
        }
        self.spec
            .set_hooks(Some(hooks).filter(|h| *h != Hooks::default()));
        Ok(())
    }
}

/// The namespace `ns` joins, if any; runc treats an empty path as none.
pub fn joins(ns: &LinuxNamespace) -> Option<&Path> {
    ns.path().as_deref().filter(|p| !p.as_os_str().is_empty())
}

/// Whether `mount` takes a host path as its source, as runc decides it: a
/// `bind` type or a `bind`/`rbind` option.
pub fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::Value;

    const CONFIG: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts", "type": "none", "source": "/etc/hosts", "options": ["bind"]},
            {"destination": "/rel", "type": "none", "source": "relative/dir", "options": ["bind"]}
        ],
        "linux": {
            "cgroupsPath": "/tenant-a/web1",
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]
        }
    }"#;

    fn rewrite() -> DestinationRewrite {
        DestinationRewrite {
            container_id: "web1".into(),
            rootfs: "/var/lib/migrate-dst/containers/web1/rootfs".into(),
            cgroup_parent: Some("/migrate-dst/".into()),
            network_hook: Some(Hook {
                path: "/usr/local/bin/migrate-dst".into(),
                args: vec!["migrate-dst".into(), "network-hook".into()],
            }),
        }
    }

    fn rewritten(text: &str, rw: &DestinationRewrite) -> Value {
        let mut cfg = BundleConfig::parse(text).unwrap();
        cfg.rewrite_for_destination(rw).unwrap();
        serde_json::from_str(&cfg.to_json()).unwrap()
    }

    #[test]
    fn reads_what_the_source_needs() {
        let cfg = BundleConfig::parse(CONFIG).unwrap();
        assert_eq!(
            cfg.root_path(Path::new("/bundles/web1")).unwrap(),
            PathBuf::from("/bundles/web1/rootfs")
        );
        assert!(cfg.has_private_netns());
        assert!(!cfg.uses_terminal());
        assert_eq!(cfg.cgroups_path(), Some("/tenant-a/web1"));
        assert_eq!(
            cfg.bind_mount_sources(),
            [PathBuf::from("/srv/data"), PathBuf::from("/etc/hosts")]
        );
        assert_eq!(cfg.bind_mounts().len(), 3);
        assert_eq!(cfg.bind_mounts()[2].source, PathBuf::from("relative/dir"));
    }

    #[test]
    fn a_config_without_a_root_path_or_process_is_refused() {
        let cfg = BundleConfig::parse(r#"{"ociVersion": "1.0.2"}"#).unwrap();
        assert!(matches!(
            cfg.root_path(Path::new("/b")),
            Err(BundleError::Missing("root.path"))
        ));
        // The spec requires process.cwd: typed parsing says which field.
        let err = BundleConfig::parse(r#"{"process": {"user": {}}}"#).unwrap_err();
        assert!(format!("{:?}", err).contains("cwd"), "{err:?}");
        assert!(BundleConfig::parse("[]").is_err());
    }

    #[test]
    fn runc_spec_output_survives_a_round_trip() {
        let text = include_str!("testdata/runc-spec.json");
        // Capability sets are sets: their order is not kept.
        let sorted = |mut v: Value| {
            for set in v["process"]["capabilities"]
                .as_object_mut()
                .unwrap()
                .values_mut()
            {
                set.as_array_mut()
                    .unwrap()
                    .sort_by_key(|c| c.as_str().unwrap().to_owned());
            }
            v
        };
        let before: Value = serde_json::from_str(text).unwrap();
        let after: Value =
            serde_json::from_str(&BundleConfig::parse(text).unwrap().to_json()).unwrap();
        assert_eq!(sorted(after), sorted(before));
    }

    #[test]
    fn rewrites_rootfs_cgroup_and_adds_network_hook() {
        let v = rewritten(CONFIG, &rewrite());
        assert_eq!(
            v["root"]["path"],
            "/var/lib/migrate-dst/containers/web1/rootfs"
        );
        assert_eq!(v["root"]["readonly"], false);
        assert_eq!(v["linux"]["cgroupsPath"], "/migrate-dst/web1");
        assert_eq!(
            v["hooks"]["createRuntime"][0]["path"],
            "/usr/local/bin/migrate-dst"
        );
        assert_eq!(v["hooks"]["createRuntime"][0]["args"][1], "network-hook");
        // Untouched parts stay as they were.
        assert_eq!(v["process"]["args"][0], "sh");
        assert_eq!(v["mounts"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn drops_the_sources_hooks_and_keeps_cgroup_when_no_parent() {
        let text = CONFIG.replace(
            r#""ociVersion": "1.0.2-dev","#,
            r#""ociVersion": "1.0.2-dev", "hooks": {
                "prestart": [{"path": "/bin/evil"}],
                "createRuntime": [{"path": "/bin/true"}],
                "poststop": [{"path": "/bin/rm", "args": ["rm", "-rf", "/"]}]
            },"#,
        );
        let mut rw = rewrite();
        rw.cgroup_parent = None;
        let v = rewritten(&text, &rw);
        assert_eq!(v["linux"]["cgroupsPath"], "/tenant-a/web1");
        let hooks = v["hooks"].as_object().unwrap();
        assert_eq!(hooks.keys().collect::<Vec<_>>(), ["createRuntime"]);
        let create_runtime = hooks["createRuntime"].as_array().unwrap();
        assert_eq!(create_runtime.len(), 1);
        assert_eq!(create_runtime[0]["path"], "/usr/local/bin/migrate-dst");
    }

    #[test]
    fn no_network_hook_for_shared_netns() {
        let text = CONFIG.replace(
            r#"{"type": "network"}"#,
            r#"{"type": "network", "path": "/run/netns/x"}"#,
        );
        let cfg = BundleConfig::parse(&text).unwrap();
        assert!(!cfg.has_private_netns());
        let v = rewritten(&text, &rewrite());
        assert!(v.get("hooks").is_none());
    }

    #[test]
    fn an_empty_namespace_path_is_a_new_namespace() {
        let text = CONFIG.replace(
            r#"{"type": "network"}"#,
            r#"{"type": "network", "path": ""}"#,
        );
        assert!(BundleConfig::parse(&text).unwrap().has_private_netns());
    }

    #[test]
    fn systemd_cgroup_paths_are_refused_with_a_parent() {
        let text = CONFIG.replace("/tenant-a/web1", "system.slice:docker:web1");
        let mut cfg = BundleConfig::parse(&text).unwrap();
        let err = cfg.rewrite_for_destination(&rewrite()).unwrap_err();
        assert!(err.to_string().contains("systemd"), "{err}");
    }

    #[test]
    fn missing_cgroups_path_gets_parent_and_id() {
        let text = CONFIG.replace(r#""cgroupsPath": "/tenant-a/web1","#, "");
        let v = rewritten(&text, &rewrite());
        assert_eq!(v["linux"]["cgroupsPath"], "/migrate-dst/web1");
    }
}
