//! The UDP socket under each endpoint, with kernel buffers sized for the
//! bursts of a migration rather than the host's default.
//!
//! Measured between the two namespace hosts: with the default receive
//! buffer (212992 bytes here) the destination dropped 287 of 11924 datagrams
//! (`RcvbufErrors`) during a 512 MiB stop-and-copy; each drop costs a loss
//! recovery and a smaller congestion window.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// What each buffer is asked to hold: several round trips of a fast link.
pub const UDP_BUFFER_BYTES: usize = 16 << 20;

/// Binds `addr` and sizes its buffers: past `net.core.rmem_max` and
/// `wmem_max` when the process may (root: the FORCE options), else as far
/// as those limits allow.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    if setsockopt(&socket, sockopt::RcvBufForce, &UDP_BUFFER_BYTES).is_err() {
        setsockopt(&socket, sockopt::RcvBuf, &UDP_BUFFER_BYTES)?;
    }
    if setsockopt(&socket, sockopt::SndBufForce, &UDP_BUFFER_BYTES).is_err() {
        setsockopt(&socket, sockopt::SndBuf, &UDP_BUFFER_BYTES)?;
    }
    let granted = getsockopt(&socket, sockopt::RcvBuf)?;
    tracing::debug!(%addr, receive_buffer = granted, "UDP socket bound");
    Ok(socket)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn buffers_grow_as_far_as_the_process_may() {
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        let default = getsockopt(&plain, sockopt::RcvBuf).unwrap();
        let sized = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let granted = getsockopt(&sized, sockopt::RcvBuf).unwrap();
        if nix::unistd::geteuid().is_root() {
            // The kernel doubles what it is asked, for its own bookkeeping.
            assert!(granted >= UDP_BUFFER_BYTES, "{granted}");
        } else {
            assert!(granted >= default, "{granted} < {default}");
        }
    }
}
