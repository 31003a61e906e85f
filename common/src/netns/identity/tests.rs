//! Fixtures in `../testdata/` are iproute2 6.1's output for a container
//! netns with eth0 (a veth, MAC 02:42:0a:4d:00:0a, MTU 1400, 10.77.0.10/24
//! and fd00:77::10/64, default routes via 10.77.0.1 and fd00:77::1 and a
//! route to 10.88.0.0/16) whose host end vethfx0 is a port of br0; and for
//! a second one with a veth that is on no bridge (eth1) and a macvlan.

use super::*;

const LINKS: &str = include_str!("../testdata/veth-container-links.json");
const ADDRS: &str = include_str!("../testdata/veth-container-addrs.json");
const ROUTES4: &str = include_str!("../testdata/veth-container-routes4.json");
const ROUTES6: &str = include_str!("../testdata/veth-container-routes6.json");
const HOST: &str = include_str!("../testdata/veth-host-links.json");
const OTHER_LINKS: &str = include_str!("../testdata/other-container-links.json");
const OTHER_HOST: &str = include_str!("../testdata/other-host-links.json");

/// The loopback-only output of `ip -j -d link show`.
const LO_ONLY: &str = r#"[{"ifindex":1,"ifname":"lo","mtu":65536,"address":"00:00:00:00:00:00"}]"#;

fn route(destination: &str, gateway: &str) -> NetRoute {
    NetRoute {
        destination: destination.to_owned(),
        gateway: gateway.to_owned(),
        device: "eth0".to_owned(),
    }
}

fn expected() -> NetworkIdentity {
    NetworkIdentity {
        interfaces: vec![NetInterface {
            name: "eth0".to_owned(),
            mac: "02:42:0a:4d:00:0a".to_owned(),
            mtu: 1400,
            addresses: vec!["10.77.0.10/24".to_owned(), "fd00:77::10/64".to_owned()],
            bridge: "br0".to_owned(),
            host_peer: "vethfx0".to_owned(),
        }],
        routes: vec![
            route("default", "10.77.0.1"),
            route("10.88.0.0/16", "10.77.0.1"),
            route("default", "fd00:77::1"),
        ],
    }
}

#[test]
fn a_bridged_veth_moves_with_global_addresses_and_its_own_routes() {
    let id = parse_identity(LINKS, ADDRS, ROUTES4, ROUTES6, HOST)
        .unwrap()
        .unwrap();
    assert_eq!(id, expected());
    assert_eq!(
        addresses(&id),
        [
            "10.77.0.10".parse::<IpAddr>().unwrap(),
            "fd00:77::10".parse().unwrap()
        ]
    );
}

#[test]
fn loopback_alone_is_no_identity() {
    assert_eq!(
        parse_identity(LO_ONLY, "[]", "[]", "[]", HOST).unwrap(),
        None
    );
}

#[test]
fn a_veth_on_no_bridge_or_a_macvlan_is_refused_by_name() {
    let err = parse_identity(OTHER_LINKS, "[]", "[]", "[]", OTHER_HOST).unwrap_err();
    assert_eq!(
        err.to_string(),
        "eth1's host end vethfx1 is not a port of a bridge: only veth pairs on a bridge move"
    );
    // The macvlan alone, as the second container would list it without eth1.
    let mut links: Vec<serde_json::Value> = serde_json::from_str(OTHER_LINKS).unwrap();
    links.retain(|l| l["ifname"] != "eth1");
    let err = parse_identity(
        &serde_json::to_string(&links).unwrap(),
        "[]",
        "[]",
        "[]",
        OTHER_HOST,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "mv0 is a macvlan: only veth pairs on a bridge move"
    );
}

#[test]
fn a_veth_whose_peer_is_not_on_the_host_is_refused() {
    // The host's ifindex 3 is a veth whose own peer is another namespace's
    // ifindex 7, not eth0.
    let mut host: Vec<serde_json::Value> = serde_json::from_str(HOST).unwrap();
    for link in &mut host {
        if link["ifindex"] == 3 {
            link["link_index"] = 7.into();
        }
    }
    let host = serde_json::to_string(&host).unwrap();
    let err = parse_identity(LINKS, ADDRS, ROUTES4, ROUTES6, &host).unwrap_err();
    assert!(
        matches!(&err, IdentityError::PeerElsewhere { interface } if interface == "eth0"),
        "{err}"
    );
    let err = parse_identity(LINKS, ADDRS, ROUTES4, ROUTES6, LO_ONLY).unwrap_err();
    assert!(matches!(err, IdentityError::PeerElsewhere { .. }), "{err}");
}

#[test]
fn routes_that_do_not_fit_are_refused_and_gatewayless_defaults_get_a_family() {
    let parse4 = |routes: &str| parse_identity(LINKS, ADDRS, routes, "[]", HOST);
    let err = parse4(r#"[{"dst":"10.9.0.0/16","type":"blackhole","flags":[]}]"#).unwrap_err();
    assert!(err.to_string().contains("of type blackhole"), "{err}");
    let err = parse4(r#"[{"dst":"10.9.0.0/16","dev":"lo","flags":[]}]"#).unwrap_err();
    assert!(err.to_string().contains("through lo"), "{err}");
    let err = parse4(r#"[{"dst":"default","flags":[]}]"#).unwrap_err();
    assert!(err.to_string().contains("multipath"), "{err}");

    let id = parse4(r#"[{"dst":"default","dev":"eth0"},{"dst":"10.9.0.5","dev":"eth0"}]"#)
        .unwrap()
        .unwrap();
    assert_eq!(
        id.routes,
        [route("0.0.0.0/0", ""), route("10.9.0.5/32", "")]
    );
    let id = parse_identity(
        LINKS,
        ADDRS,
        "[]",
        r#"[{"dst":"default","dev":"eth0"},{"dst":"ff00::/8","dev":"eth0"}]"#,
        HOST,
    )
    .unwrap()
    .unwrap();
    assert_eq!(id.routes, [route("::/0", "")]);
    assert!(id.routes.iter().all(route_is_ipv6));
}

#[test]
fn output_that_is_not_ip_json_is_an_error_naming_the_command() {
    let err = parse_identity(LINKS, "Cannot open netlink socket", "[]", "[]", HOST).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot read the output of `ip -j addr show`"
    );
}

#[test]
fn a_sound_identity_passes() {
    check_identity(&expected()).unwrap();
    check_identity(&NetworkIdentity::default()).unwrap();
}

/// The error `check_identity` gives `expected()` changed by `change`.
fn refused(change: impl FnOnce(&mut NetworkIdentity)) -> String {
    let mut id = expected();
    change(&mut id);
    check_identity(&id).unwrap_err().to_string()
}

#[test]
fn bad_interface_fields_are_named() {
    let iface = |f: fn(&mut NetInterface)| refused(|id| f(&mut id.interfaces[0]));
    for (change, expected) in [
        (
            iface(|i| i.name = "eth0 x".to_owned()),
            "interface 0 (eth0 x): name \"eth0 x\" is not a valid interface name",
        ),
        (
            iface(|i| i.bridge = "a".repeat(16)),
            "interface 0 (eth0): bridge \"aaaaaaaaaaaaaaaa\" is not a valid interface name",
        ),
        (
            iface(|i| i.host_peer = "x/y".to_owned()),
            "interface 0 (eth0): host_peer \"x/y\" is not a valid interface name",
        ),
        (
            iface(|i| i.name = "lo".to_owned()),
            "interface 0 (lo): name \"lo\" is the loopback's",
        ),
        (
            iface(|i| i.mac = "02:42:0a:4d:00".to_owned()),
            "interface 0 (eth0): mac \"02:42:0a:4d:00\" is not 6 hex octets",
        ),
        (
            iface(|i| i.mac = "01:00:5e:00:00:01".to_owned()),
            "interface 0 (eth0): mac \"01:00:5e:00:00:01\" is a multicast address",
        ),
        (
            iface(|i| i.mac = "00:00:00:00:00:00".to_owned()),
            "interface 0 (eth0): mac \"00:00:00:00:00:00\" is all zero",
        ),
        (
            iface(|i| i.mtu = 67),
            "interface 0 (eth0): mtu \"67\" is not within 68..=65535",
        ),
        (
            iface(|i| i.mtu = 65536),
            "interface 0 (eth0): mtu \"65536\" is not within 68..=65535",
        ),
        (
            iface(|i| i.addresses[0] = "10.77.0.10/33".to_owned()),
            "interface 0 (eth0): address \"10.77.0.10/33\" is not an IP address and prefix length",
        ),
        (
            iface(|i| i.addresses[1] = "fd00::1".to_owned()),
            "interface 0 (eth0): address \"fd00::1\" is not an IP address and prefix length",
        ),
        (
            iface(|i| i.addresses[1] = "224.0.0.1/4".to_owned()),
            "interface 0 (eth0): address \"224.0.0.1/4\" is not a unicast address",
        ),
        (
            iface(|i| i.addresses[1] = i.addresses[0].clone()),
            "interface 0 (eth0): address \"10.77.0.10/24\" is there twice",
        ),
    ] {
        assert_eq!(change, expected);
    }
    let twice = refused(|id| {
        let again = id.interfaces[0].clone();
        id.interfaces.push(again);
    });
    assert_eq!(
        twice,
        "interface 1 (eth0): name \"eth0\" is taken by an earlier interface"
    );
}

#[test]
fn bad_route_fields_are_named() {
    let at = |f: fn(&mut NetRoute)| refused(|id| f(&mut id.routes[1]));
    for (change, expected) in [
        (
            at(|r| r.device = "eth1".to_owned()),
            "route 1 (to 10.88.0.0/16): device \"eth1\" is none of the interfaces",
        ),
        (
            at(|r| r.device = String::new()),
            "route 1 (to 10.88.0.0/16): device \"\" is not a valid interface name",
        ),
        (
            at(|r| r.destination = "10.88.0.1/16".to_owned()),
            "route 1 (to 10.88.0.1/16): destination \"10.88.0.1/16\" has host bits set",
        ),
        (
            at(|r| r.destination = "10.88.0.0".to_owned()),
            "route 1 (to 10.88.0.0): destination \"10.88.0.0\" is neither \"default\" nor a prefix",
        ),
        (
            at(|r| r.gateway = "fd00:77::1".to_owned()),
            "route 1 (to 10.88.0.0/16): gateway \"fd00:77::1\" is not of the destination's family",
        ),
        (
            at(|r| r.gateway = "gw".to_owned()),
            "route 1 (to 10.88.0.0/16): gateway \"gw\" is not an IP address",
        ),
    ] {
        assert_eq!(change, expected);
    }
    let default_on_link = refused(|id| id.routes[0].gateway.clear());
    assert!(
        default_on_link.starts_with("route 0 (to default): gateway \"\" is needed"),
        "{default_on_link}"
    );
}

#[test]
fn limits_and_long_strings_are_refused_before_parsing() {
    let many = refused(|id| {
        let one = id.interfaces[0].clone();
        id.interfaces = (0..9)
            .map(|n| NetInterface {
                name: format!("eth{n}"),
                ..one.clone()
            })
            .collect();
    });
    assert_eq!(many, "9 interfaces, at most 8 move");
    let routes = refused(|id| id.routes = vec![route("default", "10.77.0.1"); 65]);
    assert_eq!(routes, "65 routes, at most 64 move");
    let addresses = refused(|id| {
        id.interfaces[0].addresses = (0..17).map(|n| format!("10.77.0.{n}/24")).collect()
    });
    assert_eq!(addresses, "17 addresses on eth0, at most 16 move");

    let long = refused(|id| id.interfaces[0].mac = "0".repeat(1 << 20));
    assert_eq!(
        long,
        format!(
            "interface 0 (eth0): mac \"{}…\" is too long",
            "0".repeat(32)
        )
    );
    let long = refused(|id| id.routes[0].gateway = "1".repeat(1 << 20));
    assert!(long.ends_with("…\" is too long"), "{long}");
    let shown_escaped = refused(|id| id.interfaces[0].name = "e\n\"".to_owned());
    assert!(
        shown_escaped.starts_with("interface 0 (e\\n\\\"): name"),
        "{shown_escaped}"
    );
}

#[test]
fn names_prefixes_and_macs() {
    for ok in ["eth0", "br-1a2b", "eth0.100", "a", "x".repeat(15).as_str()] {
        assert!(valid_ifname(ok), "{ok}");
    }
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a:b",
        "a b",
        "a\tb",
        "é",
        "x".repeat(16).as_str(),
    ] {
        assert!(!valid_ifname(bad), "{bad}");
    }
    assert_eq!(
        Prefix::parse("fd00::/8"),
        Some(Prefix {
            addr: "fd00::".parse().unwrap(),
            len: 8
        })
    );
    for bad in [
        "10.0.0.0/+8",
        "10.0.0.0/",
        "10.0.0.0",
        "/8",
        "::/129",
        "10.0.0.0/0008",
    ] {
        assert_eq!(Prefix::parse(bad), None, "{bad}");
    }
    assert!(Prefix::parse("0.0.0.0/0").unwrap().is_network());
    assert!(Prefix::parse("10.77.0.10/32").unwrap().is_network());
    assert!(!Prefix::parse("::1/127").unwrap().is_network());
    assert_eq!(
        parse_mac("02:42:0A:4d:00:0a"),
        Some([2, 0x42, 10, 0x4d, 0, 10])
    );
    for bad in [
        "02:42:0a:4d:00:0a:00",
        "02:42:0a:4d:00:+a",
        "0242.0a4d.000a",
        "",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad}");
    }
}
