//! Making a container's interfaces again on the destination, from the
//! hook, before CRIU restores the sockets that use their addresses.
//!
//! The plan is data ([`Step`]s, built by pure functions) so that its order
//! and arguments are tested without root; [`recreate`] runs it.

use std::process::Command;

use super::identity::{check_identity, route_is_ipv6, Prefix};
use super::{in_netns, NetnsError};
use crate::process::run;
use crate::protocol::{NetInterface, NetRoute, NetworkIdentity};

/// Where a step's command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// The caller's network namespace, the host's.
    Host,
    /// The container's, through `nsenter`.
    Container,
}

/// One command of the plan.
#[derive(Debug, PartialEq, Eq)]
struct Step {
    /// What it does, for the error when it fails.
    what: String,
    side: Side,
    program: &'static str,
    args: Vec<String>,
}

impl Step {
    fn new(what: String, side: Side, program: &'static str, args: &[&str]) -> Self {
        Self {
            what,
            side,
            program,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }
}

/// Makes `id`'s interfaces in the network namespace of `pid`: each a veth
/// whose host end, named `host_names[i]`, goes on the interface's bridge;
/// then the routes. Runs in the host's namespace, so before
/// [`super::bring_up_loopback`], which leaves the calling process in the
/// container's. On a failure the host ends made so far are deleted (their
/// peers go with them) and the error names the step and carries the
/// tool's output.
pub fn recreate(pid: u32, id: &NetworkIdentity, host_names: &[String]) -> Result<(), NetnsError> {
    check_identity(id)?;
    if host_names.len() != id.interfaces.len() {
        return Err(NetnsError::HostNames {
            interfaces: id.interfaces.len(),
            names: host_names.len(),
        });
    }
    let pid_arg = pid.to_string();
    let mut made: Vec<&str> = Vec::new();
    let result = (|| {
        for (iface, host_name) in id.interfaces.iter().zip(host_names) {
            let mut steps = interface_steps(iface, host_name, &pid_arg).into_iter();
            // The first step makes the pair: from then on it is ours to undo.
            if let Some(step) = steps.next() {
                run_step(pid, step)?;
                made.push(host_name);
            }
            for step in steps {
                run_step(pid, step)?;
            }
        }
        id.routes
            .iter()
            .try_for_each(|route| run_step(pid, route_step(route)))
    })();
    if result.is_err() {
        for name in made {
            if let Err(e) = run(Command::new("ip").args(["link", "del", "dev", name])) {
                tracing::warn!("removing host end {name} after a failed recreate: {e}");
            }
        }
    }
    result
}

fn run_step(pid: u32, step: Step) -> Result<(), NetnsError> {
    let mut cmd = match step.side {
        Side::Host => Command::new(step.program),
        Side::Container => in_netns(pid, step.program),
    };
    run(cmd.args(&step.args)).map_err(|source| NetnsError::Step {
        step: step.what,
        source,
    })?;
    Ok(())
}

/// The steps that make `iface` in the namespace of pid `pid_arg`, its host
/// end named `host_name`.
fn interface_steps(iface: &NetInterface, host_name: &str, pid_arg: &str) -> Vec<Step> {
    let name = iface.name.as_str();
    let mtu = iface.mtu.to_string();
    let mut steps = vec![
        // The peer is made in the container's namespace under its own name
        // (the kernel checks the name there, where only lo exists), with
        // the MAC the peers' ARP caches hold.
        Step::new(
            format!("making the veth pair {host_name} / {name}"),
            Side::Host,
            "ip",
            &[
                "link", "add", host_name, "mtu", &mtu, "type", "veth", "peer", "name", name,
                "address", &iface.mac, "mtu", &mtu, "netns", pid_arg,
            ],
        ),
        // Up on the bridge before the container's end comes up: that end
        // then has carrier at once, and the announcements it sends when it
        // comes up reach the bridge instead of a peer that is down.
        Step::new(
            format!("putting {host_name} on bridge {}", iface.bridge),
            Side::Host,
            "ip",
            &[
                "link",
                "set",
                "dev",
                host_name,
                "master",
                &iface.bridge,
                "up",
            ],
        ),
    ];
    let families = iface.addresses.iter().filter_map(|a| Prefix::parse(a));
    let (mut v4, mut v6) = (false, false);
    for prefix in families {
        if prefix.addr.is_ipv6() {
            v6 = true;
        } else {
            v4 = true;
        }
    }
    // The kernel announces the addresses (gratuitous ARP, unsolicited NA)
    // when the link comes up: peers whose caches lost the entry learn it
    // again without asking. A '/' path keeps a '.' in a name literal.
    for (on, key) in [
        (v4, format!("net/ipv4/conf/{name}/arp_notify=1")),
        (v6, format!("net/ipv6/conf/{name}/ndisc_notify=1")),
    ] {
        if on {
            steps.push(Step::new(
                format!("announcing {name}'s addresses ({key})"),
                Side::Container,
                "sysctl",
                &["-q", "-w", &key],
            ));
        }
    }
    for address in &iface.addresses {
        let mut args = vec!["addr", "add", address.as_str(), "dev", name];
        // Without duplicate address detection, so that a restored socket
        // can bind the address at once instead of after DAD's second.
        if address.contains(':') {
            args.push("nodad");
        }
        steps.push(Step::new(
            format!("adding address {address} to {name}"),
            Side::Container,
            "ip",
            &args,
        ));
    }
    steps.push(Step::new(
        format!("setting {name} up"),
        Side::Container,
        "ip",
        &["link", "set", "dev", name, "up"],
    ));
    steps
}

fn route_step(route: &NetRoute) -> Step {
    let mut args = Vec::new();
    if route_is_ipv6(route) {
        args.push("-6");
    }
    args.extend(["route", "add", route.destination.as_str()]);
    if !route.gateway.is_empty() {
        args.extend(["via", route.gateway.as_str()]);
    }
    args.extend(["dev", route.device.as_str()]);
    let via = match route.gateway.as_str() {
        "" => String::new(),
        gateway => format!(" via {gateway}"),
    };
    Step::new(
        format!(
            "adding the route to {}{via} on {}",
            route.destination, route.device
        ),
        Side::Container,
        "ip",
        &args,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn eth0(addresses: &[&str]) -> NetInterface {
        NetInterface {
            name: "eth0".to_owned(),
            mac: "02:42:0a:4d:00:0a".to_owned(),
            mtu: 1400,
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            bridge: "br0".to_owned(),
            host_peer: "veth1".to_owned(),
        }
    }

    fn command(step: &Step) -> String {
        std::iter::once(step.program.to_owned())
            .chain(step.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn commands(steps: &[Step]) -> Vec<(Side, String)> {
        steps.iter().map(|s| (s.side, command(s))).collect()
    }

    #[test]
    fn the_host_end_is_bridged_before_the_container_end_is_configured_and_up() {
        let steps = interface_steps(
            &eth0(&["10.77.0.10/24", "fd00:77::10/64"]),
            "mgab12cd340",
            "4242",
        );
        use Side::*;
        assert_eq!(
            commands(&steps),
            [
                (Host, "ip link add mgab12cd340 mtu 1400 type veth peer name eth0 address 02:42:0a:4d:00:0a mtu 1400 netns 4242".to_owned()),
                (Host, "ip link set dev mgab12cd340 master br0 up".to_owned()),
                (Container, "sysctl -q -w net/ipv4/conf/eth0/arp_notify=1".to_owned()),
                (Container, "sysctl -q -w net/ipv6/conf/eth0/ndisc_notify=1".to_owned()),
                (Container, "ip addr add 10.77.0.10/24 dev eth0".to_owned()),
                (Container, "ip addr add fd00:77::10/64 dev eth0 nodad".to_owned()),
                (Container, "ip link set dev eth0 up".to_owned()),
            ]
        );
        assert_eq!(steps[4].what, "adding address 10.77.0.10/24 to eth0");
    }

    #[test]
    fn announcements_only_for_the_families_the_interface_has() {
        let only_v4 = commands(&interface_steps(&eth0(&["10.77.0.10/24"]), "h", "1"));
        assert!(only_v4.iter().any(|(_, c)| c.contains("arp_notify")));
        assert!(!only_v4.iter().any(|(_, c)| c.contains("ndisc_notify")));
        let none = commands(&interface_steps(&eth0(&[]), "h", "1"));
        assert!(!none.iter().any(|(_, c)| c.starts_with("sysctl")));
        assert_eq!(none.len(), 3);
    }

    #[test]
    fn routes_take_their_family_and_gateway() {
        let route = |destination: &str, gateway: &str| NetRoute {
            destination: destination.to_owned(),
            gateway: gateway.to_owned(),
            device: "eth0".to_owned(),
        };
        let cases = [
            (
                route("default", "10.77.0.1"),
                "ip route add default via 10.77.0.1 dev eth0",
            ),
            (
                route("default", "fe80::1"),
                "ip -6 route add default via fe80::1 dev eth0",
            ),
            (
                route("10.88.0.0/16", ""),
                "ip route add 10.88.0.0/16 dev eth0",
            ),
            (route("::/0", ""), "ip -6 route add ::/0 dev eth0"),
        ];
        for (route, expected) in cases {
            let step = route_step(&route);
            assert_eq!(step.side, Side::Container);
            assert_eq!(command(&step), expected);
        }
        assert_eq!(
            route_step(&route("default", "10.77.0.1")).what,
            "adding the route to default via 10.77.0.1 on eth0"
        );
    }

    #[test]
    fn an_unchecked_identity_or_too_few_names_make_nothing() {
        let mut id = NetworkIdentity {
            interfaces: vec![eth0(&["10.77.0.10/24"])],
            routes: Vec::new(),
        };
        assert!(matches!(
            recreate(1, &id, &[]),
            Err(NetnsError::HostNames {
                interfaces: 1,
                names: 0
            })
        ));
        id.interfaces[0].bridge = "br0; reboot".to_owned();
        assert!(matches!(
            recreate(1, &id, &["h".to_owned()]),
            Err(NetnsError::Identity(_))
        ));
    }
}
