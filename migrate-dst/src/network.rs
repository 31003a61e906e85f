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
use migrate_common::policy::Policy;
use migrate_common::protocol::{NetworkIdentity, TcpConnection, MAX_CLOSED_CONNECTIONS};
use prost::Message;

/// The identity's file in the bundle dir.
const IDENTITY_FILE: &str = "network.pb";
/// The connections restored closed, one "local remote" per line: in the
/// bundle, so that a restore adopted after a restart still tells their
/// peers.
const CLOSED_CONNECTIONS_FILE: &str = "closed-connections";
/// The most that file is read of: [`MAX_CLOSED_CONNECTIONS`] lines of two
/// bracketed IPv6 endpoints.
const MAX_CLOSED_CONNECTIONS_BYTES: u64 = MAX_CLOSED_CONNECTIONS as u64 * 112;
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
    let id = read_identity(path)?;
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

/// Keeps, for [`restored`], the connections the source saw open at the
/// dump that are restored closed: at most [`MAX_CLOSED_CONNECTIONS`], the
/// rest dropped (their peers find out when they time out).
pub fn note_closed(bundle: &Path, closed: &[TcpConnection]) -> Result<()> {
    let path = bundle.join(CLOSED_CONNECTIONS_FILE);
    std::fs::write(&path, closed_lines(closed))
        .with_context(|| format!("writing {}", path.display()))
}

/// Once the container whose bundle is `bundle` runs here (pid `pid`), the
/// restore returned and CRIU's own lock is gone: lifts the hook's guard,
/// announces where its addresses are now and tells the peers of
/// connections restored closed that they are gone. Nothing to do for a
/// container that came without an identity.
pub fn restored(bundle: &Path, pid: u32) -> Result<Option<netns::Told>> {
    let path = bundle.join(IDENTITY_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let id = read_identity(&path)?;
    netns::lift_reset_guard(pid).context("lifting the guard against resets")?;
    let closed = read_closed(&bundle.join(CLOSED_CONNECTIONS_FILE))?;
    let told = netns::tell_peers(pid, &id, &closed).context("telling the container's peers")?;
    Ok(Some(told))
}

fn closed_lines(closed: &[TcpConnection]) -> String {
    closed
        .iter()
        .take(MAX_CLOSED_CONNECTIONS)
        .filter(|c| {
            !(c.local.contains(char::is_whitespace) || c.remote.contains(char::is_whitespace))
        })
        .map(|c| format!("{} {}\n", c.local, c.remote))
        .collect()
}

/// What [`note_closed`] wrote, none when it wrote nothing; like the
/// identity, bounded and parsed again by [`netns::reset_probes`].
fn read_closed(path: &Path) -> Result<Vec<TcpConnection>> {
    let len = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if len > MAX_CLOSED_CONNECTIONS_BYTES {
        bail!(
            "{} holds {len} bytes, more than {MAX_CLOSED_CONNECTIONS} connections",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_closed(&text))
}

fn parse_closed(text: &str) -> Vec<TcpConnection> {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(local, remote)| TcpConnection {
            local: local.to_owned(),
            remote: remote.to_owned(),
        })
        .take(MAX_CLOSED_CONNECTIONS)
        .collect()
}

/// The identity [`prepare`] wrote, checked again: the file is in a
/// directory other processes could write to.
fn read_identity(path: &Path) -> Result<NetworkIdentity> {
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
    Ok(id)
}

/// The preflight's verdict on the identity: whether it is well formed, the
/// policy lets it join its bridges, and this host has them and none of its
/// addresses; None for a container without one.
pub fn preflight(
    policy: &Policy,
    network: Option<&NetworkIdentity>,
) -> Option<Result<String, Vec<String>>> {
    let id = network?;
    if let Err(e) = identity::check_identity(id) {
        return Some(Err(vec![format!("the container's network identity: {e}")]));
    }
    let refused = refused_bridges(policy, id);
    if !refused.is_empty() {
        return Some(Err(refused));
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

/// Why the policy refuses each bridge of `id` it does not allow: a port on
/// a host bridge puts the container on that bridge's network, which the
/// destination's operator chooses, not the source.
fn refused_bridges(policy: &Policy, id: &NetworkIdentity) -> Vec<String> {
    let mut bridges: Vec<&str> = id.interfaces.iter().map(|i| i.bridge.as_str()).collect();
    bridges.sort_unstable();
    bridges.dedup();
    bridges
        .into_iter()
        .filter(|b| !policy.bridge_allowed(b))
        .map(|b| {
            format!(
                "moved containers may not join bridge {b} on this host (it allows {}): add \
                 `--allow-bridge {b}` to migrate-dst's command line to let them",
                policy.bridges_text()
            )
        })
        .collect()
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
    fn closed_connections_survive_their_file_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_closed(&dir.path().join(CLOSED_CONNECTIONS_FILE))
            .unwrap()
            .is_empty());
        let connection = |local: &str, remote: &str| TcpConnection {
            local: local.into(),
            remote: remote.into(),
        };
        let closed = vec![
            connection("10.77.0.10:7000", "10.77.0.200:41000"),
            connection("[fd00:77::10]:7000", "[fd00:77::200]:41002"),
            connection("10.77.0.10:7000", "10.77.0.200:1 extra"),
        ];
        note_closed(dir.path(), &closed).unwrap();
        let read = read_closed(&dir.path().join(CLOSED_CONNECTIONS_FILE)).unwrap();
        assert_eq!(read, closed[..2]);

        let many = vec![
            connection(
                "[fd00:77::10]:65535",
                "[fd00:77:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            );
            MAX_CLOSED_CONNECTIONS + 5
        ];
        note_closed(dir.path(), &many).unwrap();
        let read = read_closed(&dir.path().join(CLOSED_CONNECTIONS_FILE)).unwrap();
        assert_eq!(read.len(), MAX_CLOSED_CONNECTIONS);
    }

    #[test]
    fn a_malformed_identity_is_refused_before_the_host_is_asked() {
        let mut bad = identity();
        bad.interfaces[0].bridge = "../../x".into();
        let refused = preflight(&allowing_mbr0(), Some(&bad))
            .unwrap()
            .unwrap_err();
        assert!(
            refused[0].starts_with("the container's network identity"),
            "{refused:?}"
        );
        assert!(preflight(&allowing_mbr0(), None).is_none());
    }

    fn allowing_mbr0() -> Policy {
        Policy::new(&[], Vec::new(), false)
            .unwrap()
            .with_bridges(&["mbr0".into()])
    }

    #[test]
    fn only_the_bridges_the_policy_names_may_be_joined() {
        let none = Policy::new(&[], Vec::new(), false).unwrap();
        let refused = preflight(&none, Some(&identity())).unwrap().unwrap_err();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains("may not join bridge mbr0")
                && refused[0].contains("it allows none")
                && refused[0].contains("--allow-bridge mbr0"),
            "{refused:?}"
        );
        let other = none.clone().with_bridges(&["br-mgmt".into()]);
        let refused = refused_bridges(&other, &identity());
        assert!(
            refused[0].contains("--allow-bridge br-mgmt)"),
            "{refused:?}"
        );
        assert!(refused_bridges(&allowing_mbr0(), &identity()).is_empty());
        let privileged = Policy::new(&[], Vec::new(), true).unwrap();
        assert!(refused_bridges(&privileged, &identity()).is_empty());
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
