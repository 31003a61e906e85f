//! What the destination tells a moved container's peers once it runs
//! there: where its addresses are now (a gratuitous ARP for each IPv4
//! address, an unsolicited neighbour advertisement for each IPv6 one), and,
//! for connections restored closed, that they are gone.
//!
//! Peers keep the MAC (it moved with the container), but the switches
//! between them still send it to the source's port until a frame from the
//! destination passes by. A container restored with its connections sends
//! one soon (its retransmissions); one restored without them may stay silent,
//! and a client's retransmissions then vanish on the source for as long as
//! a switch keeps its entry (300 s on a Linux bridge). The kernel's
//! `arp_notify` announces when the link comes up, which in the hook is
//! before the addresses and the carrier are there; so the destination
//! announces again here, after the restore.
//!
//! A connection restored closed has no socket on the destination, so the
//! destination's kernel resets whatever the peer sends on it. But a peer
//! may send nothing: a client waiting for the reply to a request that the
//! frozen source's kernel acknowledged waits forever. So the destination
//! sends each peer a segment of that connection out of its window; the
//! peer answers with an acknowledgement carrying the sequence number it
//! expects (RFC 793's reply to an unacceptable segment), and the kernel,
//! finding no socket, answers that with a reset the peer accepts (its
//! sequence number is the one expected). No sequence number needs to be
//! known here.
//!
//! The frames and segments are built whole (pure functions, tested below)
//! and sent in the container's namespace, from a thread of their own:
//! setns changes the calling thread only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{
    self as sock, AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage,
};

use super::identity::{addresses, parse_mac, Prefix};
use super::NetnsError;
use crate::protocol::{NetworkIdentity, TcpConnection, MAX_CLOSED_CONNECTIONS};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const BROADCAST: [u8; 6] = [0xff; 6];
/// ff02::1, all nodes on the link, and the MAC it maps to (RFC 2464).
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// One frame to send: the interface it leaves by and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub interface: String,
    pub frame: Vec<u8>,
}

/// The frames that announce every address of `id` from its interface's
/// MAC; an interface whose MAC or address does not parse announces nothing
/// (the identity was checked when it arrived).
pub fn announcements(id: &NetworkIdentity) -> Vec<Announcement> {
    let mut frames = Vec::new();
    for interface in &id.interfaces {
        let Some(mac) = parse_mac(&interface.mac) else {
            continue;
        };
        for prefix in interface.addresses.iter().filter_map(|a| Prefix::parse(a)) {
            let frame = match prefix.addr {
                IpAddr::V4(addr) => gratuitous_arp(mac, addr),
                IpAddr::V6(addr) => unsolicited_neighbour_advertisement(mac, addr),
            };
            frames.push(Announcement {
                interface: interface.name.clone(),
                frame,
            });
        }
    }
    frames
}

/// A segment that makes the peer of a connection restored closed reset it
/// (see the module's comment): from `local`, one of the container's
/// addresses, to `remote`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetProbe {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub segment: Vec<u8>,
}

/// The probes for `closed`: those from an address of `id` to a peer that
/// is neither loopback, nor unspecified, nor multicast; at most
/// [`MAX_CLOSED_CONNECTIONS`]. The others are not ours to send, or are
/// malformed.
pub fn reset_probes(id: &NetworkIdentity, closed: &[TcpConnection]) -> Vec<ResetProbe> {
    let ours = addresses(id);
    closed
        .iter()
        .filter_map(|c| Some((c.local.parse().ok()?, c.remote.parse().ok()?)))
        .filter(|(local, remote): &(SocketAddr, SocketAddr)| {
            let peer = remote.ip();
            ours.contains(&local.ip())
                && local.is_ipv4() == remote.is_ipv4()
                && !(peer.is_loopback() || peer.is_unspecified() || peer.is_multicast())
                && remote.port() != 0
        })
        .take(MAX_CLOSED_CONNECTIONS)
        .map(|(local, remote)| ResetProbe {
            local,
            remote,
            segment: out_of_window_ack(local, remote),
        })
        .collect()
}

/// What [`tell_peers`] sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Told {
    pub announcements: usize,
    pub reset_probes: usize,
}

/// Sends [`announcements`] of `id` and the [`reset_probes`] of `closed` in
/// the network namespace of `pid`.
pub fn tell_peers(
    pid: u32,
    id: &NetworkIdentity,
    closed: &[TcpConnection],
) -> Result<Told, NetnsError> {
    let frames = announcements(id);
    let probes = reset_probes(id, closed);
    let told = Told {
        announcements: frames.len(),
        reset_probes: probes.len(),
    };
    if frames.is_empty() && probes.is_empty() {
        return Ok(told);
    }
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).map_err(|source| NetnsError::Open {
        path: path.clone(),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Enter { path, source })?;
                // Announced first: the peers' answers to the probes must
                // come here, not to the source.
                if !frames.is_empty() {
                    let socket = packet_socket()?;
                    for Announcement { interface, frame } in &frames {
                        send_frame(&socket, interface, frame)?;
                    }
                }
                for probe in &probes {
                    send_probe(probe)?;
                }
                Ok(told)
            })
            .join()
            .unwrap_or_else(|_| Err(NetnsError::Announce("the sending thread panicked".into())))
    })
}

/// A bare ACK of the connection with sequence and acknowledgement numbers
/// 0: out of the peer's window (but for a chance of one in about 2^32 /
/// window), so the peer answers with the numbers it expects.
fn out_of_window_ack(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    const ACK: u8 = 0x10;
    let mut segment = Vec::with_capacity(20);
    segment.extend_from_slice(&local.port().to_be_bytes());
    segment.extend_from_slice(&remote.port().to_be_bytes());
    segment.extend_from_slice(&[0; 8]); // sequence, acknowledgement
    segment.extend_from_slice(&[5 << 4, ACK]); // 5 words of header
    segment.extend_from_slice(&[0; 6]); // window, checksum, urgent
    let checksum = transport_checksum(local.ip(), remote.ip(), TCP, &segment);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    segment
}

/// An ARP request whose sender and target are both `addr` (RFC 5227's
/// announcement; what Linux's `arp_notify` sends), to everyone.
fn gratuitous_arp(mac: [u8; 6], addr: Ipv4Addr) -> Vec<u8> {
    let mut frame = ethernet(BROADCAST, mac, ETH_P_ARP);
    frame.extend_from_slice(&[0, 1]); // hardware: Ethernet
    frame.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    frame.extend_from_slice(&[6, 4]); // their lengths
    frame.extend_from_slice(&[0, 1]); // request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&addr.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&addr.octets());
    frame
}

/// A neighbour advertisement of `addr` at `mac` to all nodes, with the
/// override flag so that caches replace what they had (RFC 4861 7.2.6).
fn unsolicited_neighbour_advertisement(mac: [u8; 6], addr: Ipv6Addr) -> Vec<u8> {
    const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
    const OVERRIDE: u8 = 0x20;
    const TARGET_LINK_LAYER_ADDRESS: u8 = 2;
    let mut icmp = vec![NEIGHBOUR_ADVERTISEMENT, 0, 0, 0, OVERRIDE, 0, 0, 0];
    icmp.extend_from_slice(&addr.octets());
    icmp.extend_from_slice(&[TARGET_LINK_LAYER_ADDRESS, 1]); // length in 8 octets
    icmp.extend_from_slice(&mac);
    let checksum = transport_checksum(addr.into(), ALL_NODES.into(), ICMPV6, &icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut frame = ethernet(ALL_NODES_MAC, mac, ETH_P_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no class or flow
    let payload_len = u16::try_from(icmp.len()).unwrap_or(u16::MAX);
    frame.extend_from_slice(&payload_len.to_be_bytes());
    frame.extend_from_slice(&[ICMPV6, 255]); // hop limit 255, or it is ignored
    frame.extend_from_slice(&addr.octets());
    frame.extend_from_slice(&ALL_NODES.octets());
    frame.extend_from_slice(&icmp);
    frame
}

fn ethernet(to: [u8; 6], from: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(86);
    frame.extend_from_slice(&to);
    frame.extend_from_slice(&from);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

const TCP: u8 = 6;
const ICMPV6: u8 = 58;

/// The Internet checksum of `message` (a TCP segment, an ICMPv6 message)
/// over its pseudo-header: both addresses, the protocol and the length.
fn transport_checksum(from: IpAddr, to: IpAddr, protocol: u8, message: &[u8]) -> u16 {
    let len = u32::try_from(message.len()).unwrap_or(0);
    let mut pseudo = Vec::with_capacity(40 + message.len());
    match (from, to) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            pseudo.extend_from_slice(&from.octets());
            pseudo.extend_from_slice(&to.octets());
            pseudo.extend_from_slice(&[0, protocol]);
            pseudo.extend_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
        }
        _ => {
            pseudo.extend_from_slice(&v6_octets(from));
            pseudo.extend_from_slice(&v6_octets(to));
            pseudo.extend_from_slice(&len.to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, protocol]);
        }
    }
    pseudo.extend_from_slice(message);
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

fn v6_octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Sends `probe` on a raw socket bound to its local address: the kernel
/// routes it and adds the IP header.
fn send_probe(probe: &ResetProbe) -> Result<(), NetnsError> {
    let failed = |what: &str, e: nix::Error| {
        NetnsError::Announce(format!(
            "{what} for {} → {}: {e}",
            probe.local, probe.remote
        ))
    };
    let family = if probe.local.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let socket = sock::socket(
        family,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Tcp,
    )
    .map_err(|e| failed("opening a raw socket", e))?;
    // A raw socket's port is its protocol: 0 takes the socket's.
    let at = |addr: SocketAddr| SockaddrStorage::from(SocketAddr::new(addr.ip(), 0));
    sock::bind(socket.as_raw_fd(), &at(probe.local)).map_err(|e| failed("binding", e))?;
    sock::sendto(
        socket.as_raw_fd(),
        &probe.segment,
        &at(probe.remote),
        sock::MsgFlags::empty(),
    )
    .map_err(|e| failed("sending a probe", e))?;
    Ok(())
}

/// A packet socket that only sends (protocol 0 receives nothing).
fn packet_socket() -> Result<OwnedFd, NetnsError> {
    // SAFETY: a plain syscall with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetnsError::Announce(format!(
            "opening a packet socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_frame(socket: &OwnedFd, interface: &str, frame: &[u8]) -> Result<(), NetnsError> {
    let failed = |what: String| NetnsError::Announce(format!("{interface}: {what}"));
    let index = nix::net::if_::if_nametoindex(interface)
        .map_err(|e| failed(format!("no such interface: {e}")))?;
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or_default();
    to.sll_ifindex = i32::try_from(index).map_err(|_| failed("interface index".into()))?;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `to` outlive the call, and the lengths passed are
    // theirs.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::addr_of!(to).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(0),
        )
    };
    if sent < 0 {
        return Err(failed(format!(
            "sending an announcement: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::NetInterface;

    const MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x0a];

    #[test]
    fn a_gratuitous_arp_names_the_address_as_sender_and_target() {
        let frame = gratuitous_arp(MAC, Ipv4Addr::new(10, 77, 0, 10));
        assert_eq!(frame.len(), 42);
        assert_eq!(frame[..6], BROADCAST);
        assert_eq!(frame[6..12], MAC);
        assert_eq!(frame[12..14], [0x08, 0x06]);
        assert_eq!(frame[14..22], [0, 1, 0x08, 0, 6, 4, 0, 1]);
        assert_eq!(frame[22..28], MAC);
        assert_eq!(frame[28..32], [10, 77, 0, 10]);
        assert_eq!(frame[32..38], [0; 6]);
        assert_eq!(frame[38..42], [10, 77, 0, 10]);
    }

    #[test]
    fn a_neighbour_advertisement_overrides_and_checks_out() {
        let addr: Ipv6Addr = "fd00:77::10".parse().unwrap();
        let frame = unsolicited_neighbour_advertisement(MAC, addr);
        assert_eq!(frame.len(), 14 + 40 + 32);
        assert_eq!(frame[..6], ALL_NODES_MAC);
        assert_eq!(frame[12..14], [0x86, 0xdd]);
        assert_eq!(frame[18..20], [0, 32], "payload length");
        assert_eq!(frame[20..22], [58, 255], "ICMPv6, hop limit 255");
        assert_eq!(frame[22..38], addr.octets());
        assert_eq!(frame[38..54], ALL_NODES.octets());
        let icmp = &frame[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4], 0x20, "override, neither router nor solicited");
        assert_eq!(icmp[8..24], addr.octets());
        assert_eq!(icmp[24..26], [2, 1]);
        assert_eq!(icmp[26..32], MAC);
        // A message with its checksum in place sums to zero.
        assert_eq!(
            transport_checksum(addr.into(), ALL_NODES.into(), ICMPV6, icmp),
            0
        );
    }

    #[test]
    fn the_checksum_matches_a_known_value() {
        // RFC 1071's example words, with an empty pseudo-header's share
        // removed: the sum of 0001 f203 f4f5 f6f7 is ddf2 folded, ~ = 220d.
        let zero = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let message = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        // The pseudo-header adds the length (8) and the next header (58).
        let expected = !(0xddf2u16 + 8 + 58);
        assert_eq!(transport_checksum(zero, zero, ICMPV6, &message), expected);
    }

    fn identity() -> NetworkIdentity {
        NetworkIdentity {
            interfaces: vec![NetInterface {
                name: "eth0".into(),
                mac: "02:77:00:00:00:0a".into(),
                mtu: 1500,
                addresses: vec!["10.77.0.10/24".into(), "fd00:77::10/64".into()],
                bridge: "mbr0".into(),
                host_peer: "veth0".into(),
            }],
            routes: Vec::new(),
        }
    }

    #[test]
    fn every_address_is_announced_from_its_interface() {
        let sent = announcements(&identity());
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|a| a.interface == "eth0"));
        assert_eq!(sent[0].frame[12..14], [0x08, 0x06]);
        assert_eq!(sent[1].frame[12..14], [0x86, 0xdd]);
    }

    fn connection(local: &str, remote: &str) -> TcpConnection {
        TcpConnection {
            local: local.into(),
            remote: remote.into(),
        }
    }

    #[test]
    fn only_connections_from_the_containers_addresses_are_probed() {
        let closed = [
            connection("10.77.0.10:7000", "10.77.0.100:33702"),
            connection("[fd00:77::10]:7000", "[fd00:77::64]:5555"),
            connection("10.77.0.11:7000", "10.77.0.100:33703"),
            connection("10.77.0.10:7000", "127.0.0.1:1"),
            connection("10.77.0.10:7000", "224.0.0.1:1"),
            connection("10.77.0.10:7000", "10.77.0.100:0"),
            connection("10.77.0.10:7000", "[fd00:77::64]:5555"),
            connection("10.77.0.10", "10.77.0.100:1"),
        ];
        let probes = reset_probes(&identity(), &closed);
        let ends: Vec<_> = probes
            .iter()
            .map(|p| (p.local.to_string(), p.remote.to_string()))
            .collect();
        assert_eq!(
            ends,
            [
                ("10.77.0.10:7000".to_owned(), "10.77.0.100:33702".to_owned()),
                (
                    "[fd00:77::10]:7000".to_owned(),
                    "[fd00:77::64]:5555".to_owned()
                ),
            ]
        );
        let many = vec![connection("10.77.0.10:7000", "10.77.0.100:1"); MAX_CLOSED_CONNECTIONS + 1];
        assert_eq!(
            reset_probes(&identity(), &many).len(),
            MAX_CLOSED_CONNECTIONS
        );
    }

    #[test]
    fn a_probe_is_an_ack_out_of_window_that_checks_out() {
        let local: SocketAddr = "10.77.0.10:7000".parse().unwrap();
        let remote: SocketAddr = "10.77.0.100:33702".parse().unwrap();
        let segment = out_of_window_ack(local, remote);
        assert_eq!(segment.len(), 20);
        assert_eq!(segment[..4], [0x1b, 0x58, 0x83, 0xa6]);
        assert_eq!(segment[4..12], [0; 8]);
        assert_eq!(segment[12..14], [0x50, 0x10], "5 words, ACK alone");
        assert_eq!(
            transport_checksum(local.ip(), remote.ip(), TCP, &segment),
            0
        );
        let v6 = out_of_window_ack(
            "[fd00:77::10]:7000".parse().unwrap(),
            "[fd00:77::64]:5555".parse().unwrap(),
        );
        let (from, to) = (
            "fd00:77::10".parse().unwrap(),
            "fd00:77::64".parse().unwrap(),
        );
        assert_eq!(transport_checksum(from, to, TCP, &v6), 0);
    }
}
