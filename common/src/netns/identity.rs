//! A container's network identity: found on the source in the output of
//! `ip -j` ([`parse_identity`]), checked on the destination before anything
//! is made of it ([`check_identity`]), since there it comes off the wire.
//!
//! What moves is a veth pair whose host end is a port of a bridge: the
//! container's end keeps its name, MAC, MTU and addresses, the destination
//! makes a new host end on a bridge of the same name. The kernel's own
//! routes for the addresses and the link-local ones come back by themselves
//! when the addresses are added; the others move.

use std::net::IpAddr;

use super::ip_json::{self, AddrLink, JsonError, Link, Route};
use crate::protocol::{NetInterface, NetRoute, NetworkIdentity};

pub const MAX_INTERFACES: usize = 8;
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_ROUTES: usize = 64;
/// Above any valid value of any field (an IPv6 prefix takes at most 43
/// bytes): checked before a field is parsed or shown.
const MAX_FIELD_BYTES: usize = 64;
/// The kernel's limit on an interface name, its terminating NUL included.
const IFNAMSIZ: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error("{interface} is a {kind}: only veth pairs on a bridge move")]
    NotVeth { interface: String, kind: String },
    #[error(
        "{interface}'s peer is not in the host's network namespace: only veth pairs on a bridge move"
    )]
    PeerElsewhere { interface: String },
    #[error(
        "{interface}'s host end {peer} is not a port of a bridge: only veth pairs on a bridge move"
    )]
    NotBridged { interface: String, peer: String },
    #[error("the route to {destination} is {reason}: only unicast routes through the container's veths move")]
    UnsupportedRoute { destination: String, reason: String },
    #[error("{count} {what}, at most {max} move")]
    TooMany {
        what: String,
        count: usize,
        max: usize,
    },
    #[error("interface {index} ({name}): {field} \"{value}\" {problem}")]
    Interface {
        index: usize,
        name: String,
        field: &'static str,
        value: String,
        problem: &'static str,
    },
    #[error("route {index} (to {destination}): {field} \"{value}\" {problem}")]
    Route {
        index: usize,
        destination: String,
        field: &'static str,
        value: String,
        problem: &'static str,
    },
}

/// The identity of the container whose network namespace printed the
/// first four outputs (`ip -j -d link show`, `ip -j addr show`, `ip -j
/// route show`, `ip -j -6 route show`); `host_links` is `ip -j -d link
/// show` in the host's namespace, where the veths' other ends are. `None`
/// when the container has no interface but loopback.
pub fn parse_identity(
    container_links: &str,
    container_addrs: &str,
    container_routes_v4: &str,
    container_routes_v6: &str,
    host_links: &str,
) -> Result<Option<NetworkIdentity>, IdentityError> {
    let links: Vec<Link> = ip_json::parse("ip -j -d link show", container_links)?;
    let addrs: Vec<AddrLink> = ip_json::parse("ip -j addr show", container_addrs)?;
    let routes_v4: Vec<Route> = ip_json::parse("ip -j route show", container_routes_v4)?;
    let routes_v6: Vec<Route> = ip_json::parse("ip -j -6 route show", container_routes_v6)?;
    let host: Vec<Link> = ip_json::parse("ip -j -d link show (host)", host_links)?;

    let mut interfaces = Vec::new();
    for link in links.iter().filter(|link| link.ifname != "lo") {
        let (peer, bridge) = host_end(link, &host)?;
        let addresses = addrs
            .iter()
            .filter(|a| a.ifindex == link.ifindex)
            .flat_map(|a| &a.addr_info)
            .filter(|info| info.scope == "global")
            .map(|info| format!("{}/{}", info.local, info.prefixlen))
            .collect();
        interfaces.push(NetInterface {
            name: link.ifname.clone(),
            mac: link.address.clone(),
            mtu: link.mtu,
            addresses,
            bridge: bridge.to_owned(),
            host_peer: peer.ifname.clone(),
        });
    }
    if interfaces.is_empty() {
        return Ok(None);
    }
    let mut routes = Vec::new();
    let all = routes_v4
        .iter()
        .map(|r| (r, false))
        .chain(routes_v6.iter().map(|r| (r, true)));
    for (route, v6) in all {
        if let Some(route) = carried_route(route, v6, &interfaces)? {
            routes.push(route);
        }
    }
    let identity = NetworkIdentity { interfaces, routes };
    // The destination would refuse it: better said here, before anything
    // is frozen.
    check_identity(&identity)?;
    Ok(Some(identity))
}

/// The host's end of `link` and the bridge it is a port of.
fn host_end<'h>(link: &Link, host: &'h [Link]) -> Result<(&'h Link, &'h str), IdentityError> {
    let interface = || link.ifname.clone();
    match link.kind() {
        Some("veth") => {}
        kind => {
            return Err(IdentityError::NotVeth {
                interface: interface(),
                kind: kind.unwrap_or("device without a link kind").to_owned(),
            })
        }
    }
    // A link's `link_index` is its peer's ifindex in the peer's namespace,
    // so an ifindex alone could match an unrelated host link whose own peer
    // is elsewhere; the peer must point back at this link too.
    let peer = link
        .link_index
        .and_then(|index| {
            host.iter().find(|h| {
                h.ifindex == index && h.link_index == Some(link.ifindex) && h.kind() == Some("veth")
            })
        })
        .ok_or_else(|| IdentityError::PeerElsewhere {
            interface: interface(),
        })?;
    match (peer.port_of(), peer.master.as_deref()) {
        (Some("bridge"), Some(bridge)) => Ok((peer, bridge)),
        _ => Err(IdentityError::NotBridged {
            interface: interface(),
            peer: peer.ifname.clone(),
        }),
    }
}

/// `route` as it moves, or `None` for one the kernel makes again by itself.
fn carried_route(
    route: &Route,
    v6: bool,
    interfaces: &[NetInterface],
) -> Result<Option<NetRoute>, IdentityError> {
    if route.protocol.as_deref() == Some("kernel")
        || (v6 && matches!(route.dst.as_str(), "fe80::/64" | "ff00::/8"))
    {
        return Ok(None);
    }
    let unsupported = |reason: String| IdentityError::UnsupportedRoute {
        destination: route.dst.clone(),
        reason,
    };
    if let Some(kind) = route.kind.as_deref().filter(|k| *k != "unicast") {
        return Err(unsupported(format!("of type {kind}")));
    }
    let Some(device) = route.dev.as_deref() else {
        return Err(unsupported("on no single device (multipath?)".to_owned()));
    };
    if !interfaces.iter().any(|i| i.name == device) {
        return Err(unsupported(format!("through {device}")));
    }
    let gateway = route.gateway.clone().unwrap_or_default();
    let destination = match route.dst.as_str() {
        // "default" alone does not say which family a route on the link
        // is of, a prefix does.
        "default" if gateway.is_empty() => if v6 { "::/0" } else { "0.0.0.0/0" }.to_owned(),
        "default" => "default".to_owned(),
        dst if dst.contains('/') => dst.to_owned(),
        host_route => format!("{host_route}/{}", if v6 { 128 } else { 32 }),
    };
    Ok(Some(NetRoute {
        destination,
        gateway,
        device: device.to_owned(),
    }))
}

/// Refuses an identity with more than the limits allow or a field the
/// destination's `ip` commands must not be given.
pub fn check_identity(id: &NetworkIdentity) -> Result<(), IdentityError> {
    let too_many = |what: &str, count: usize, max: usize| {
        (count > max).then(|| IdentityError::TooMany {
            what: what.to_owned(),
            count,
            max,
        })
    };
    if let Some(e) = too_many("interfaces", id.interfaces.len(), MAX_INTERFACES) {
        return Err(e);
    }
    if let Some(e) = too_many("routes", id.routes.len(), MAX_ROUTES) {
        return Err(e);
    }
    for (index, iface) in id.interfaces.iter().enumerate() {
        let bad = |field, value: &str, problem| IdentityError::Interface {
            index,
            name: shown(&iface.name),
            field,
            value: shown(value),
            problem,
        };
        for (field, value) in [
            ("name", &iface.name),
            ("bridge", &iface.bridge),
            ("host_peer", &iface.host_peer),
        ] {
            if !valid_ifname(value) {
                return Err(bad(field, value, "is not a valid interface name"));
            }
        }
        if iface.name == "lo" {
            return Err(bad("name", &iface.name, "is the loopback's"));
        }
        if id.interfaces[..index].iter().any(|i| i.name == iface.name) {
            return Err(bad("name", &iface.name, "is taken by an earlier interface"));
        }
        if iface.mac.len() > MAX_FIELD_BYTES {
            return Err(bad("mac", &iface.mac, "is too long"));
        }
        match parse_mac(&iface.mac) {
            None => return Err(bad("mac", &iface.mac, "is not 6 hex octets")),
            Some(mac) if mac[0] & 1 == 1 => {
                return Err(bad("mac", &iface.mac, "is a multicast address"))
            }
            Some(mac) if mac == [0; 6] => return Err(bad("mac", &iface.mac, "is all zero")),
            Some(_) => {}
        }
        if !(68..=65535).contains(&iface.mtu) {
            return Err(bad(
                "mtu",
                &iface.mtu.to_string(),
                "is not within 68..=65535",
            ));
        }
        if let Some(e) = too_many(
            &format!("addresses on {}", shown(&iface.name)),
            iface.addresses.len(),
            MAX_ADDRESSES,
        ) {
            return Err(e);
        }
        for (n, address) in iface.addresses.iter().enumerate() {
            let prefix = (address.len() <= MAX_FIELD_BYTES)
                .then(|| Prefix::parse(address))
                .flatten()
                .ok_or_else(|| bad("address", address, "is not an IP address and prefix length"))?;
            if prefix.addr.is_unspecified() || prefix.addr.is_multicast() {
                return Err(bad("address", address, "is not a unicast address"));
            }
            if iface.addresses[..n].contains(address) {
                return Err(bad("address", address, "is there twice"));
            }
        }
    }
    for (index, route) in id.routes.iter().enumerate() {
        check_route(index, route, &id.interfaces)?;
    }
    Ok(())
}

fn check_route(
    index: usize,
    route: &NetRoute,
    interfaces: &[NetInterface],
) -> Result<(), IdentityError> {
    let bad = |field, value: &str, problem| IdentityError::Route {
        index,
        destination: shown(&route.destination),
        field,
        value: shown(value),
        problem,
    };
    for (field, value) in [
        ("destination", &route.destination),
        ("gateway", &route.gateway),
    ] {
        if value.len() > MAX_FIELD_BYTES {
            return Err(bad(field, value, "is too long"));
        }
    }
    if !valid_ifname(&route.device) {
        return Err(bad(
            "device",
            &route.device,
            "is not a valid interface name",
        ));
    }
    if !interfaces.iter().any(|i| i.name == route.device) {
        return Err(bad("device", &route.device, "is none of the interfaces"));
    }
    let gateway = match route.gateway.as_str() {
        "" => None,
        text => Some(
            text.parse::<IpAddr>()
                .map_err(|_| bad("gateway", text, "is not an IP address"))?,
        ),
    };
    if route.destination == "default" {
        return match gateway {
            Some(_) => Ok(()),
            None => Err(bad(
                "gateway",
                "",
                "is needed by a default route to tell its family (a route on the link is 0.0.0.0/0 or ::/0)",
            )),
        };
    }
    let destination = Prefix::parse(&route.destination).ok_or_else(|| {
        bad(
            "destination",
            &route.destination,
            "is neither \"default\" nor a prefix",
        )
    })?;
    if !destination.is_network() {
        return Err(bad("destination", &route.destination, "has host bits set"));
    }
    match gateway {
        Some(gw) if gw.is_ipv6() != destination.addr.is_ipv6() => Err(bad(
            "gateway",
            &route.gateway,
            "is not of the destination's family",
        )),
        _ => Ok(()),
    }
}

/// An address or a network and its prefix length: "10.77.0.10/24".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn parse(text: &str) -> Option<Prefix> {
        let (addr, len) = text.split_once('/')?;
        // u8's parser takes a leading '+', which `ip` does not.
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let addr: IpAddr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        let max = if addr.is_ipv6() { 128 } else { 32 };
        (len <= max).then_some(Prefix { addr, len })
    }

    /// Whether the bits past the prefix are zero, as a route's destination
    /// must have them.
    fn is_network(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => u32::from(a).checked_shl(u32::from(self.len)).unwrap_or(0) == 0,
            IpAddr::V6(a) => u128::from(a).checked_shl(u32::from(self.len)).unwrap_or(0) == 0,
        }
    }
}

/// Whether a route of a checked identity is an IPv6 one.
pub fn route_is_ipv6(route: &NetRoute) -> bool {
    let family_of = if route.destination == "default" {
        route.gateway.parse::<IpAddr>().ok()
    } else {
        Prefix::parse(&route.destination).map(|p| p.addr)
    };
    family_of.is_some_and(|a| a.is_ipv6())
}

/// The addresses of every interface of an identity, without their prefix
/// lengths; fields that are not addresses (in an unchecked identity) are
/// left out.
pub fn addresses(id: &NetworkIdentity) -> Vec<IpAddr> {
    id.interfaces
        .iter()
        .flat_map(|i| &i.addresses)
        .filter_map(|a| Prefix::parse(a))
        .map(|p| p.addr)
        .collect()
}

/// Whether the kernel takes `name` for an interface (`dev_valid_name`),
/// further restricted to printable ASCII since it goes into commands and
/// messages.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// "02:42:0a:4d:00:0a" as its octets.
pub(super) fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0; 6];
    let mut parts = text.split(':');
    for octet in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A field of an untrusted identity as an error shows it: cut short, and
/// with control characters and quotes escaped.
fn shown(value: &str) -> String {
    const SHOWN_CHARS: usize = 32;
    let mut cut: String = value
        .chars()
        .take(SHOWN_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().nth(SHOWN_CHARS).is_some() {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
