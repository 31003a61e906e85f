//! The container's network identity on this host: checked in preflight,
//! handed to the createRuntime hook that recreates it while CRIU sets up
//! the namespaces (before any socket is restored), and the hook's guard
//! against resets lifted once the restore has returned.
//!
//! The hook runs as a separate process (runc starts it), so what it needs
//! goes in the container's bundle dir: the identity as the source sent it,
//! and on its command line the names of the host's ends.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use migrate_common::netns::{self, identity};
use migrate_common::protocol::NetworkIdentity;
use prost::Message;

/// The identity's file in the bundle dir.
const IDENTITY_FILE: &str = "network.pb";
/// The most the hook reads of it: `identity::check_identity` bounds what an
/// identity may hold far below this.
const MAX_IDENTITY_BYTES: u64 = 256 << 10;

/// What the hook is told: the identity's file and the host's ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookNetwork {
    pub identity: PathBuf,
    pub host_ends: Vec<String>,
}

impl HookNetwork {
    /// The hook's arguments after `network-hook`.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--identity".to_owned(), self.identity.display().to_string()];
        for end in &self.host_ends {
            args.push("--host-end".into());
            args.push(end.clone());
        }
        args
    }
}

/// Writes the identity for the hook into `bundle`; the host's ends are
/// named after the container, so a later migration of the same container
/// gets the same names and a leftover of an earlier one is found.
pub fn prepare(bundle: &Path, container_id: &str, id: &NetworkIdentity) -> Result<HookNetwork> {
    let path = bundle.join(IDENTITY_FILE);
    std::fs::write(&path, id.encode_to_vec())
        .with_context(|| format!("writing {}", path.display()))?;
    let host_ends = (0..id.interfaces.len())
        .map(|i| netns::host_veth_name(container_id, i))
        .collect();
    Ok(HookNetwork {
        identity: path,
        host_ends,
    })
}

/// In the hook (a single-threaded process, in the host's namespace): the
/// guard against resets first, then the interfaces, so that nothing the
/// new namespace sends before CRIU's own lock tells a peer its connection
/// is gone.
pub fn recreate_in_hook(path: &Path, pid: u32, host_ends: &[String]) -> Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_IDENTITY_BYTES {
        bail!(
            "{} holds {len} bytes, more than an identity",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let id = NetworkIdentity::decode(bytes.as_slice())
        .with_context(|| format!("decoding {}", path.display()))?;
    identity::check_identity(&id)?;
    if host_ends.len() != id.interfaces.len() {
        bail!(
            "{} host ends named for {} interfaces",
            host_ends.len(),
            id.interfaces.len()
        );
    }
    netns::guard_resets(pid).context("guarding against resets")?;
    netns::recreate(pid, &id, host_ends).context("recreating the container's interfaces")?;
    Ok(())
}

/// Whether the container whose bundle is `bundle` came with an identity.
pub fn has_identity(bundle: &Path) -> bool {
    bundle.join(IDENTITY_FILE).exists()
}

/// Lifts the hook's guard from the restored container (pid `pid`), once the
/// restore has returned and CRIU's own lock is gone.
pub fn restored(pid: u32) -> Result<()> {
    netns::lift_reset_guard(pid).context("lifting the guard against resets")?;
    Ok(())
}

/// The preflight's verdict on the identity: whether it is well formed and
/// this host has its bridges and none of its addresses; None for a
/// container without one.
pub fn preflight(network: Option<&NetworkIdentity>) -> Option<Result<String, Vec<String>>> {
    let id = network?;
    if let Err(e) = identity::check_identity(id) {
        return Some(Err(vec![format!("the container's network identity: {e}")]));
    }
    let mut reasons = Vec::new();
    match netns::missing_bridges(id) {
        Ok(missing) => {
            for bridge in missing {
                let on = id
                    .interfaces
                    .iter()
                    .filter(|i| i.bridge == bridge)
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                reasons.push(format!(
                    "no bridge {bridge} on this host: the container's {on} is a port of it on the \
                     source"
                ));
            }
        }
        Err(e) => reasons.push(format!("listing this host's bridges: {e:#}")),
    }
    match netns::addresses_in_use(id) {
        Ok(used) => {
            for address in used {
                reasons.push(format!(
                    "address {address} is already assigned to an interface of this host"
                ));
            }
        }
        Err(e) => reasons.push(format!("listing this host's addresses: {e:#}")),
    }
    if !reasons.is_empty() {
        return Some(Err(reasons));
    }
    Some(Ok(describe(id)))
}

/// "eth0 (10.77.0.10/24) onto bridge mbr0".
fn describe(id: &NetworkIdentity) -> String {
    id.interfaces
        .iter()
        .map(|i| {
            format!(
                "{} ({}) onto bridge {}",
                i.name,
                i.addresses.join(", "),
                i.bridge
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use migrate_common::protocol::NetInterface;

    fn identity() -> NetworkIdentity {
        NetworkIdentity {
            interfaces: vec![NetInterface {
                name: "eth0".into(),
                mac: "02:77:00:00:00:0a".into(),
                mtu: 1500,
                addresses: vec!["10.77.0.10/24".into()],
                bridge: "mbr0".into(),
                host_peer: "veth1a".into(),
            }],
            routes: Vec::new(),
        }
    }

    #[test]
    fn the_hook_gets_the_file_and_one_host_end_per_interface() {
        let dir = tempfile::tempdir().unwrap();
        let hook = prepare(dir.path(), "web-1", &identity()).unwrap();
        assert_eq!(hook.host_ends, vec![netns::host_veth_name("web-1", 0)]);
        let written = std::fs::read(&hook.identity).unwrap();
        assert_eq!(
            NetworkIdentity::decode(written.as_slice()).unwrap(),
            identity()
        );
        assert_eq!(
            hook.args(),
            [
                "--identity".to_owned(),
                hook.identity.display().to_string(),
                "--host-end".into(),
                hook.host_ends[0].clone(),
            ]
        );
    }

    #[test]
    fn a_malformed_identity_is_refused_before_the_host_is_asked() {
        let mut bad = identity();
        bad.interfaces[0].bridge = "../../x".into();
        let refused = preflight(Some(&bad)).unwrap().unwrap_err();
        assert!(
            refused[0].starts_with("the container's network identity"),
            "{refused:?}"
        );
        assert!(preflight(None).is_none());
    }

    #[test]
    fn the_hook_refuses_a_file_for_other_interfaces() {
        let dir = tempfile::tempdir().unwrap();
        let hook = prepare(dir.path(), "web-1", &identity()).unwrap();
        let err = recreate_in_hook(&hook.identity, 1, &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("0 host ends named for 1 interfaces"),
            "{err:#}"
        );
    }
}
