//! The container's OCI `config.json`: what the source reads from it, and how
//! the destination rewrites it for its own host. Pure functions over JSON,
//! tested without root.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("config.json is not valid JSON")]
    Json(#[from] serde_json::Error),
    #[error("config.json has no {0}")]
    Missing(&'static str),
    #[error("config.json: {0}")]
    Unsupported(String),
}

/// A hook as OCI defines it.
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

#[derive(Debug, Clone)]
pub struct BundleConfig {
    value: Value,
}

impl BundleConfig {
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        let value: Value = serde_json::from_str(text)?;
        if !value.is_object() {
            return Err(BundleError::Unsupported(
                "top level is not an object".into(),
            ));
        }
        Ok(Self { value })
    }

    pub fn to_json(&self) -> String {
        // Serialising a Value cannot fail.
        serde_json::to_string_pretty(&self.value).unwrap_or_default()
    }

    /// `root.path`, resolved against the bundle directory when relative.
    pub fn root_path(&self, bundle: &Path) -> Result<PathBuf, BundleError> {
        let root = self.value["root"]["path"]
            .as_str()
            .ok_or(BundleError::Missing("root.path"))?;
        Ok(bundle.join(root))
    }

    /// `linux.cgroupsPath`, when set.
    pub fn cgroups_path(&self) -> Option<&str> {
        self.value["linux"]["cgroupsPath"].as_str()
    }

    pub fn uses_terminal(&self) -> bool {
        self.value["process"]["terminal"].as_bool() == Some(true)
    }

    /// Whether the container gets a network namespace of its own (one listed
    /// without a `path` to join).
    pub fn has_private_netns(&self) -> bool {
        self.namespaces()
            .any(|ns| ns["type"] == "network" && ns.get("path").is_none())
    }

    fn namespaces(&self) -> impl Iterator<Item = &Value> {
        self.value["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
    }

    /// Host paths bind-mounted into the container: they must exist on the
    /// destination too.
    pub fn bind_mount_sources(&self) -> Vec<PathBuf> {
        self.value["mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| {
                m["type"] == "bind"
                    || m["options"]
                        .as_array()
                        .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
            })
            .filter_map(|m| m["source"].as_str())
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .collect()
    }

    pub fn rewrite_for_destination(&mut self, rw: &DestinationRewrite) -> Result<(), BundleError> {
        let root = self.value["root"]
            .as_object_mut()
            .ok_or(BundleError::Missing("root"))?;
        root.insert("path".into(), json!(rw.rootfs));

        if let Some(parent) = &rw.cgroup_parent {
            let current = self.value["linux"]["cgroupsPath"]
                .as_str()
                .unwrap_or_default();
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
            let linux = self.value["linux"]
                .as_object_mut()
                .ok_or(BundleError::Missing("linux"))?;
            linux.insert("cgroupsPath".into(), json!(format!("{parent}/{leaf}")));
        }

        if let Some(hook) = &rw.network_hook {
            if self.has_private_netns() {
                let hooks = self
                    .value
                    .as_object_mut()
                    .ok_or(BundleError::Missing("top-level object"))?
                    .entry("hooks")
                    .or_insert_with(|| json!({}));
                let list = hooks
                    .as_object_mut()
                    .ok_or(BundleError::Unsupported("hooks is not an object".into()))?
                    .entry("createRuntime")
                    .or_insert_with(|| json!([]));
                list.as_array_mut()
                    .ok_or(BundleError::Unsupported(
                        "hooks.createRuntime is not a list".into(),
                    ))?
                    .push(json!({ "path": hook.path, "args": hook.args }));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {"terminal": false, "args": ["sh"]},
        "root": {"path": "rootfs", "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts", "type": "none", "source": "/etc/hosts", "options": ["bind"]}
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

    #[test]
    fn reads_what_the_source_needs() {
        let cfg = BundleConfig::parse(CONFIG).unwrap();
        assert_eq!(
            cfg.root_path(Path::new("/bundles/web1")).unwrap(),
            PathBuf::from("/bundles/web1/rootfs")
        );
        assert!(cfg.has_private_netns());
        assert!(!cfg.uses_terminal());
        assert_eq!(
            cfg.bind_mount_sources(),
            [PathBuf::from("/srv/data"), PathBuf::from("/etc/hosts")]
        );
    }

    #[test]
    fn rewrites_rootfs_cgroup_and_adds_network_hook() {
        let mut cfg = BundleConfig::parse(CONFIG).unwrap();
        cfg.rewrite_for_destination(&rewrite()).unwrap();
        let v: Value = serde_json::from_str(&cfg.to_json()).unwrap();
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
        assert_eq!(v["mounts"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn keeps_existing_hooks_and_cgroup_when_no_parent() {
        let text = CONFIG.replace(
            r#""ociVersion": "1.0.2-dev","#,
            r#""ociVersion": "1.0.2-dev", "hooks": {"createRuntime": [{"path": "/bin/true"}]},"#,
        );
        let mut cfg = BundleConfig::parse(&text).unwrap();
        let mut rw = rewrite();
        rw.cgroup_parent = None;
        cfg.rewrite_for_destination(&rw).unwrap();
        let v: Value = serde_json::from_str(&cfg.to_json()).unwrap();
        assert_eq!(v["linux"]["cgroupsPath"], "/tenant-a/web1");
        let hooks = v["hooks"]["createRuntime"].as_array().unwrap();
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[0]["path"], "/bin/true");
    }

    #[test]
    fn no_network_hook_for_shared_netns() {
        let text = CONFIG.replace(
            r#"{"type": "network"}"#,
            r#"{"type": "network", "path": "/run/netns/x"}"#,
        );
        let mut cfg = BundleConfig::parse(&text).unwrap();
        assert!(!cfg.has_private_netns());
        cfg.rewrite_for_destination(&rewrite()).unwrap();
        let v: Value = serde_json::from_str(&cfg.to_json()).unwrap();
        assert!(v.get("hooks").is_none());
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
        let mut cfg = BundleConfig::parse(&text).unwrap();
        cfg.rewrite_for_destination(&rewrite()).unwrap();
        let v: Value = serde_json::from_str(&cfg.to_json()).unwrap();
        assert_eq!(v["linux"]["cgroupsPath"], "/migrate-dst/web1");
    }
}
