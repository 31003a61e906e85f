//! What migrate needs to know of CRIU's page-server protocol: the request
//! header, so that the source agent can relay a lazy-pages daemon's requests
//! to CRIU one whole request at a time, see the daemon's final close, and end
//! a transfer with an error CRIU understands.
//!
//! In a lazy dump CRIU serves the container's memory on a socket; the
//! destination's `criu lazy-pages` sends it requests, each a bare
//! `struct page_server_iov` (criu/page-xfer.c: `u32 cmd; u64 nr_pages; u64
//! vaddr; u64 dst_id;`, so 4 bytes of padding after `cmd`: 32 bytes, host byte
//! order), and CRIU answers each with an iov and the page data. When it has
//! every page the daemon sends `PS_IOV_FORCE_CLOSE` (it uses an inherited
//! socket, see `ps-socket`), CRIU answers a 4-byte status and ends the dump.
//!
//! Two properties of CRIU 4.2 shape the relay (measured, see
//! docs/notes-issue5.md): the end of the socket counts as success, so CRIU
//! then kills the source's processes even if no page was sent; and an unknown
//! command fails the transfer, after which CRIU puts the processes back in the
//! freezer state they had before the dump. So the relay never lets the socket
//! end before the daemon's close, and ends a transfer that must not complete
//! with [`abort_request`].

/// Size of `struct page_server_iov` on x86-64 and every other 64-bit target
/// CRIU supports (u32 followed by three u64: 4 bytes of padding).
pub const IOV_LEN: usize = 32;

/// `PS_IOV_GET`: a lazy-pages daemon asks for pages.
pub const PS_IOV_GET: u32 = 7;
/// `PS_IOV_CLOSE`: end of the transfer (sent over a connection CRIU opened).
pub const PS_IOV_CLOSE: u32 = 0x1023;
/// `PS_IOV_FORCE_CLOSE`: end of the transfer over an inherited socket.
pub const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
/// CRIU keeps flags in the bits above these (`PS_CMD_BITS`).
const CMD_MASK: u32 = 0xffff;
/// A command CRIU does not know: its page server answers with an error.
const ABORT_CMD: u32 = 0xdead;

/// One request header as CRIU lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iov {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl Iov {
    pub fn decode(bytes: &[u8; IOV_LEN]) -> Self {
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_ne_bytes(field)
        };
        let mut cmd = [0u8; 4];
        cmd.copy_from_slice(&bytes[..4]);
        Self {
            cmd: u32::from_ne_bytes(cmd),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    pub fn encode(&self) -> [u8; IOV_LEN] {
        let mut out = [0u8; IOV_LEN];
        out[..4].copy_from_slice(&self.cmd.to_ne_bytes());
        out[8..16].copy_from_slice(&self.nr_pages.to_ne_bytes());
        out[16..24].copy_from_slice(&self.vaddr.to_ne_bytes());
        out[24..32].copy_from_slice(&self.dst_id.to_ne_bytes());
        out
    }

    /// The command without CRIU's flag bits.
    pub fn command(&self) -> u32 {
        self.cmd & CMD_MASK
    }

    /// Whether this request ends the transfer: the daemon has every page.
    pub fn is_close(&self) -> bool {
        matches!(self.cmd, PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE)
    }
}

/// The request that makes CRIU's page server fail the transfer.
pub fn abort_request() -> [u8; IOV_LEN] {
    Iov {
        cmd: ABORT_CMD,
        nr_pages: 0,
        vaddr: 0,
        dst_id: 0,
    }
    .encode()
}

/// Cuts the byte stream a lazy-pages daemon sends into whole requests, so a
/// relay forwards (or withholds) requests, never part of one.
#[derive(Debug, Default)]
pub struct RequestCutter {
    partial: Vec<u8>,
}

impl RequestCutter {
    /// Adds `bytes` and returns every request now complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<[u8; IOV_LEN]> {
        self.partial.extend_from_slice(bytes);
        let whole = self.partial.len() / IOV_LEN;
        let requests = self
            .partial
            .chunks_exact(IOV_LEN)
            .map(|chunk| {
                let mut request = [0u8; IOV_LEN];
                request.copy_from_slice(chunk);
                request
            })
            .collect();
        self.partial.drain(..whole * IOV_LEN);
        requests
    }

    /// Bytes of a request not yet complete.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn iov_round_trips_with_criu_layout() {
        let iov = Iov {
            cmd: PS_IOV_GET,
            nr_pages: 3,
            vaddr: 0x7f00_dead_b000,
            dst_id: 0x0101,
        };
        let bytes = iov.encode();
        assert_eq!(&bytes[..4], &PS_IOV_GET.to_ne_bytes());
        assert_eq!(&bytes[4..8], &[0; 4], "padding after the u32 command");
        assert_eq!(&bytes[8..16], &3u64.to_ne_bytes());
        assert_eq!(Iov::decode(&bytes), iov);
        assert!(!iov.is_close());
    }

    #[test]
    fn close_and_abort_are_recognised() {
        let close = Iov::decode(
            &Iov {
                cmd: PS_IOV_FORCE_CLOSE,
                nr_pages: 0,
                vaddr: 0,
                dst_id: 0,
            }
            .encode(),
        );
        assert!(close.is_close());
        let abort = Iov::decode(&abort_request());
        assert!(!abort.is_close());
        assert!(![PS_IOV_GET, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE].contains(&abort.command()));
    }

    #[test]
    fn flags_are_masked_off_the_command() {
        let iov = Iov {
            cmd: (1 << 16) | PS_IOV_GET,
            nr_pages: 1,
            vaddr: 0,
            dst_id: 0,
        };
        assert_eq!(iov.command(), PS_IOV_GET);
    }

    #[test]
    fn cutter_releases_only_whole_requests() {
        let a = Iov {
            cmd: PS_IOV_GET,
            nr_pages: 1,
            vaddr: 4096,
            dst_id: 1,
        }
        .encode();
        let b = Iov {
            cmd: PS_IOV_FORCE_CLOSE,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        }
        .encode();
        let mut stream = a.to_vec();
        stream.extend_from_slice(&b);
        let mut cutter = RequestCutter::default();
        assert!(cutter.push(&stream[..5]).is_empty());
        assert_eq!(cutter.pending(), 5);
        assert_eq!(cutter.push(&stream[5..40]), vec![a]);
        assert_eq!(cutter.pending(), 8);
        assert_eq!(cutter.push(&stream[40..]), vec![b]);
        assert_eq!(cutter.pending(), 0);
        let mut cutter = RequestCutter::default();
        assert_eq!(cutter.push(&stream), vec![a, b]);
    }
}
