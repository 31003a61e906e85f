//! The `ip` commands that read a network identity on the source, check a
//! destination can take one, and remove a host end: each runs the command
//! and hands its JSON to a pure function that reads it.

use std::net::IpAddr;
use std::process::Command;

use super::identity::{addresses, parse_identity, valid_ifname};
use super::ip_json::{self, AddrLink, JsonError, Link};
use super::{in_netns, NetnsError};
use crate::process::run;
use crate::protocol::NetworkIdentity;

/// The network identity of the container whose init is `pid`, read in its
/// namespace through `nsenter` and, for the veths' host ends, in the
/// caller's (the host's). `None` for a container with loopback alone.
pub fn discover(pid: u32) -> Result<Option<NetworkIdentity>, NetnsError> {
    // Read without any tool first: a namespace with loopback alone needs
    // no `ip`, and hosts whose `ip` cannot print JSON (busybox) move such
    // containers as before.
    let dev_path = format!("/proc/{pid}/net/dev");
    let net_dev = std::fs::read_to_string(&dev_path).map_err(|source| NetnsError::Open {
        path: dev_path,
        source,
    })?;
    if interface_names(&net_dev).iter().all(|name| *name == "lo") {
        return Ok(None);
    }
    let inside = |args: &[&str]| run(in_netns(pid, "ip").args(args));
    let links = inside(&["-j", "-d", "link", "show"])?;
    let addrs = inside(&["-j", "addr", "show"])?;
    let routes_v4 = inside(&["-j", "route", "show"])?;
    let routes_v6 = inside(&["-j", "-6", "route", "show"])?;
    let host_links = run(Command::new("ip").args(["-j", "-d", "link", "show"]))?;
    Ok(parse_identity(
        &links,
        &addrs,
        &routes_v4,
        &routes_v6,
        &host_links,
    )?)
}

/// The interface names in a `/proc/<pid>/net/dev` table (two header lines,
/// then `name: counters` per interface).
fn interface_names(net_dev: &str) -> Vec<&str> {
    net_dev
        .lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim())
        .collect()
}

/// The bridges `id` names that the caller's network namespace lacks, or
/// has under that name as something else than a bridge; each once.
pub fn missing_bridges(id: &NetworkIdentity) -> Result<Vec<String>, NetnsError> {
    let bridges = run(Command::new("ip").args(["-j", "-d", "link", "show", "type", "bridge"]))?;
    Ok(missing_bridges_in(id, &bridges)?)
}

fn missing_bridges_in(id: &NetworkIdentity, links: &str) -> Result<Vec<String>, JsonError> {
    let links: Vec<Link> = ip_json::parse("ip -j -d link show type bridge", links)?;
    let mut missing: Vec<String> = Vec::new();
    for bridge in id.interfaces.iter().map(|i| &i.bridge) {
        let here = links
            .iter()
            .any(|l| l.ifname == *bridge && l.kind() == Some("bridge"));
        if !here && !missing.contains(bridge) {
            missing.push(bridge.clone());
        }
    }
    Ok(missing)
}

/// The addresses of `id` that an interface of the caller's network
/// namespace already has: the container's would clash with them on the
/// bridge.
pub fn addresses_in_use(id: &NetworkIdentity) -> Result<Vec<IpAddr>, NetnsError> {
    let assigned = run(Command::new("ip").args(["-j", "addr", "show"]))?;
    Ok(addresses_in_use_in(id, &assigned)?)
}

fn addresses_in_use_in(id: &NetworkIdentity, assigned: &str) -> Result<Vec<IpAddr>, JsonError> {
    let links: Vec<AddrLink> = ip_json::parse("ip -j addr show", assigned)?;
    let assigned: Vec<IpAddr> = links
        .iter()
        .flat_map(|l| &l.addr_info)
        .filter_map(|info| info.local.parse().ok())
        .collect();
    Ok(addresses(id)
        .into_iter()
        .filter(|a| assigned.contains(a))
        .collect())
}

/// The destination's name for the host end of interface `index` (below
/// [`super::identity::MAX_INTERFACES`]) of container `container_id`: the
/// same on every call, so a later cleanup finds it from the id alone, and
/// within the kernel's 15 bytes whatever the id's length.
pub fn host_veth_name(container_id: &str, index: usize) -> String {
    let hash = blake3::hash(container_id.as_bytes()).to_hex();
    format!("mg{}{index}", &hash.as_str()[..8])
}

/// Deletes the veth `name` of the caller's network namespace, and with it
/// its peer; `false` if there is none of that name. Refuses to delete an
/// interface of that name that is not a veth: a host's own uplink must not
/// go because a name was stale.
pub fn remove_host_end(name: &str) -> Result<bool, NetnsError> {
    if !valid_ifname(name) {
        return Err(NetnsError::InvalidName {
            name: name.to_owned(),
        });
    }
    let links = || run(Command::new("ip").args(["-j", "-d", "link", "show"]));
    match host_link(name, &links()?)? {
        HostLink::Absent => return Ok(false),
        HostLink::Other(kind) => {
            return Err(NetnsError::NotVeth {
                name: name.to_owned(),
                kind,
            })
        }
        HostLink::Veth => {}
    }
    match run(Command::new("ip").args(["link", "del", "dev", name])) {
        Ok(_) => Ok(true),
        // The container's namespace ending in between takes the veth with it.
        Err(e) => match host_link(name, &links()?)? {
            HostLink::Absent => Ok(false),
            _ => Err(e.into()),
        },
    }
}

#[derive(Debug, PartialEq, Eq)]
enum HostLink {
    Absent,
    Veth,
    /// Its kind, or what it is when it has none.
    Other(String),
}

fn host_link(name: &str, links: &str) -> Result<HostLink, JsonError> {
    let links: Vec<Link> = ip_json::parse("ip -j -d link show", links)?;
    Ok(match links.iter().find(|l| l.ifname == name) {
        None => HostLink::Absent,
        Some(link) => match link.kind() {
            Some("veth") => HostLink::Veth,
            Some(kind) => HostLink::Other(kind.to_owned()),
            None => HostLink::Other("device without a link kind".to_owned()),
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::NetInterface;

    const HOST_LINKS: &str = include_str!("testdata/veth-host-links.json");
    const HOST_ADDRS: &str = include_str!("testdata/veth-host-addrs.json");
    const BR0: &str = include_str!("testdata/host-link-br0.json");

    #[test]
    fn reads_interface_names_from_net_dev() {
        let table = "Inter-|   Receive                |  Transmit\n \
             face |bytes    packets errs|bytes    packets\n    \
             lo:  883461   1442    0    883461   1442\n  \
             eth0:       0       0    0        0       0\n";
        assert_eq!(interface_names(table), ["lo", "eth0"]);
        assert!(interface_names("header\nheader\n").is_empty());
    }

    fn on_bridges(bridges: &[&str], addresses: &[&str]) -> NetworkIdentity {
        NetworkIdentity {
            interfaces: bridges
                .iter()
                .enumerate()
                .map(|(n, bridge)| NetInterface {
                    name: format!("eth{n}"),
                    mac: "02:42:0a:4d:00:0a".to_owned(),
                    mtu: 1500,
                    addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
                    bridge: (*bridge).to_owned(),
                    host_peer: format!("veth{n}"),
                })
                .collect(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn bridges_missing_or_not_bridges_are_named_once() {
        let id = on_bridges(&["br0", "br9", "vethfx0", "br9", "lo"], &[]);
        assert_eq!(
            missing_bridges_in(&id, HOST_LINKS).unwrap(),
            ["br9", "vethfx0", "lo"]
        );
        assert_eq!(
            missing_bridges_in(&id, BR0).unwrap(),
            ["br9", "vethfx0", "lo"]
        );
        assert!(missing_bridges_in(&on_bridges(&["br0"], &[]), BR0)
            .unwrap()
            .is_empty());
        assert_eq!(missing_bridges_in(&id, "[]").unwrap().len(), 4);
        assert!(missing_bridges_in(&id, "Device \"br0\" does not exist.").is_err());
    }

    #[test]
    fn addresses_the_host_has_are_in_use_whatever_their_prefix() {
        let id = on_bridges(
            &["br0"],
            &[
                "10.77.0.10/24",
                "10.77.0.1/16",
                "fd00:77::1/64",
                "fd00:77::10/64",
            ],
        );
        let used = addresses_in_use_in(&id, HOST_ADDRS).unwrap();
        assert_eq!(
            used,
            [
                "10.77.0.1".parse::<IpAddr>().unwrap(),
                "fd00:77::1".parse().unwrap()
            ]
        );
        assert!(addresses_in_use_in(&id, "[]").unwrap().is_empty());
    }

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let long = "c".repeat(1024);
        for id in ["web1", "", long.as_str()] {
            for index in 0..crate::netns::identity::MAX_INTERFACES {
                let name = host_veth_name(id, index);
                assert_eq!(name, host_veth_name(id, index));
                assert!(valid_ifname(&name) && name.starts_with("mg"), "{name}");
            }
        }
        assert_eq!(host_veth_name("web1", 0).len(), 11);
        assert_ne!(host_veth_name("web1", 0), host_veth_name("web1", 1));
        assert_ne!(host_veth_name("web1", 0), host_veth_name("web2", 0));
        // A renamed hash would orphan the host ends of running containers.
        assert_eq!(
            host_veth_name("web1", 3),
            format!("mg{}3", &blake3::hash(b"web1").to_hex()[..8])
        );
    }

    #[test]
    fn only_a_veth_is_a_host_end_to_delete() {
        assert_eq!(host_link("vethfx0", HOST_LINKS).unwrap(), HostLink::Veth);
        assert_eq!(host_link("eth0", HOST_LINKS).unwrap(), HostLink::Absent);
        assert_eq!(
            host_link("br0", HOST_LINKS).unwrap(),
            HostLink::Other("bridge".to_owned())
        );
        assert_eq!(
            host_link("lo", HOST_LINKS).unwrap(),
            HostLink::Other("device without a link kind".to_owned())
        );
        assert!(matches!(
            remove_host_end("../x"),
            Err(NetnsError::InvalidName { .. })
        ));
    }
}
