//! The TCP connections a container's kernel holds, read on the source from
//! `/proc/<pid>/net/tcp{,6}` (the tables of the namespace `pid` is in; no
//! tool needed), for the destination to tell their peers when they are
//! restored closed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::NetnsError;
use crate::protocol::TcpConnection;

/// The connections of the network namespace of `pid` whose peer still
/// takes them for open, to a peer outside the container (loopback is
/// restored closed at both ends).
pub fn open_connections(pid: u32) -> Result<Vec<TcpConnection>, NetnsError> {
    let mut connections = Vec::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text =
            std::fs::read_to_string(&path).map_err(|source| NetnsError::Open { path, source })?;
        connections.extend(
            synchronized(&text)
                .into_iter()
                .filter(|(_, remote)| !remote.ip().is_loopback())
                .map(|(local, remote)| TcpConnection {
                    local: local.to_string(),
                    remote: remote.to_string(),
                }),
        );
    }
    Ok(connections)
}

/// The (local, remote) ends of the rows of a `/proc/net/tcp` or `tcp6`
/// table in a state where both ends have exchanged SYNs and the peer may
/// still send: established, either side closing, but not TIME_WAIT (the
/// peer is done) nor listening or half-open. Rows that do not parse are
/// left out.
fn synchronized(table: &str) -> Vec<(SocketAddr, SocketAddr)> {
    const ESTABLISHED: &str = "01";
    const FIN_WAIT1: &str = "04";
    const FIN_WAIT2: &str = "05";
    const CLOSE_WAIT: &str = "08";
    const LAST_ACK: &str = "09";
    const CLOSING: &str = "0B";
    table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let mut fields = row.split_whitespace().skip(1);
            let local = endpoint(fields.next()?)?;
            let remote = endpoint(fields.next()?)?;
            let state = fields.next()?;
            [
                ESTABLISHED,
                FIN_WAIT1,
                FIN_WAIT2,
                CLOSE_WAIT,
                LAST_ACK,
                CLOSING,
            ]
            .contains(&state)
            .then_some((local, remote))
        })
        .collect()
}

/// "0A004D0A:1B58" (IPv4) or 32 hex digits and a port (IPv6): the kernel
/// prints each 32-bit word of the address as the number it is in its own
/// byte order, and the port as a number.
fn endpoint(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A row as the kernel prints it, with an address in its byte order.
    fn row(local: &str, remote: &str, state: &str) -> String {
        format!(
            "   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 636 1 0 100 0 0 10 0\n"
        )
    }

    fn v4(addr: [u8; 4], port: u16) -> String {
        format!("{:08X}:{port:04X}", u32::from_ne_bytes(addr))
    }

    fn v6(addr: Ipv6Addr, port: u16) -> String {
        let words: String = addr
            .octets()
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        format!("{words}:{port:04X}")
    }

    #[test]
    fn reads_the_connections_a_peer_still_holds() {
        let server = v4([10, 77, 0, 10], 7000);
        let mut table = "  sl  local_address rem_address   st tx_queue ...\n".to_owned();
        table += &row(&v4([0, 0, 0, 0], 7000), &v4([0, 0, 0, 0], 0), "0A");
        table += &row(&server, &v4([10, 77, 0, 100], 33702), "01");
        table += &row(&server, &v4([10, 77, 0, 101], 40000), "08");
        table += &row(&server, &v4([10, 77, 0, 102], 40001), "06");
        table += &row(&server, &v4([10, 77, 0, 103], 40002), "02");
        table += "   1: not a row\n";
        let ends = synchronized(&table);
        assert_eq!(
            ends,
            [
                (
                    "10.77.0.10:7000".parse().unwrap(),
                    "10.77.0.100:33702".parse().unwrap()
                ),
                (
                    "10.77.0.10:7000".parse().unwrap(),
                    "10.77.0.101:40000".parse().unwrap()
                ),
            ]
        );
    }

    #[test]
    fn reads_ipv6_ends() {
        let local: Ipv6Addr = "fd00:77::10".parse().unwrap();
        let remote: Ipv6Addr = "fd00:77::64".parse().unwrap();
        let table = format!("header\n{}", row(&v6(local, 7000), &v6(remote, 5555), "01"));
        assert_eq!(
            synchronized(&table),
            [(
                "[fd00:77::10]:7000".parse().unwrap(),
                "[fd00:77::64]:5555".parse().unwrap()
            )]
        );
    }

    #[test]
    fn reads_this_hosts_own_table() {
        // Whatever this machine holds, every row parses: the format is the
        // kernel's, not only the one written above.
        let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        let rows = table.lines().skip(1).count();
        let parsed = table
            .lines()
            .skip(1)
            .filter(|row| {
                let mut f = row.split_whitespace().skip(1);
                f.next().and_then(endpoint).is_some() && f.next().and_then(endpoint).is_some()
            })
            .count();
        assert_eq!(parsed, rows, "{table}");
    }
}
