//! The pure parts of the tunnel: its frames, and the buffer of bytes sent but
//! not yet acknowledged that lets a transfer resume on a new connection
//! exactly where the old one stopped.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// Largest data frame accepted from the peer (checked before allocating).
pub const MAX_DATA_FRAME: usize = 1 << 20;
const KIND_DATA: u8 = 1;
const KIND_ACK: u8 = 2;

/// One frame on a tunnel stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The next bytes of the sender's stream.
    Data(Bytes),
    /// The sender has taken this many bytes of the receiver's stream; they
    /// need not be kept for a resend.
    Ack(u64),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("tunnel frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("tunnel data frame of {len} bytes exceeds the {MAX_DATA_FRAME}-byte limit")]
    TooLarge { len: usize },
    #[error(
        "a tunnel data frame of {len} bytes does not match its checksum: pages were corrupted \
         between the peer's framing and this side"
    )]
    Corrupt { len: usize },
    #[error("the peer acknowledged byte {acked}, but only {sent} were sent")]
    AckBeyondSent { acked: u64, sent: u64 },
    #[error("the peer resumes from byte {from}, but bytes from {kept} on are all that is kept")]
    ResumeBeforeKept { from: u64, kept: u64 },
}

impl Frame {
    /// The frame's bytes: a kind byte, then a big-endian length, the data's
    /// checksum ([`checksum`]) and the data, or a big-endian acknowledged
    /// offset.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Frame::Data(data) => {
                let mut out = Vec::with_capacity(1 + 4 + CHECKSUM_LEN + data.len());
                out.push(KIND_DATA);
                out.extend_from_slice(&(data.len() as u32).to_be_bytes());
                out.extend_from_slice(&checksum(data));
                out.extend_from_slice(data);
                out
            }
            Frame::Ack(offset) => {
                let mut out = Vec::with_capacity(9);
                out.push(KIND_ACK);
                out.extend_from_slice(&offset.to_be_bytes());
                out
            }
        }
    }

    /// How many bytes follow a frame's kind byte before the data (data
    /// frames) or in all (acks).
    pub fn header_len(kind: u8) -> Result<usize, FrameError> {
        match kind {
            KIND_DATA => Ok(4),
            KIND_ACK => Ok(8),
            other => Err(FrameError::UnknownKind(other)),
        }
    }

    /// The data length a data frame's header announces, bounded.
    pub fn data_len(header: [u8; 4]) -> Result<usize, FrameError> {
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_DATA_FRAME {
            return Err(FrameError::TooLarge { len });
        }
        Ok(len)
    }

    pub fn is_data(kind: u8) -> bool {
        kind == KIND_DATA
    }

    /// A received data frame, if its data matches the checksum sent with it.
    pub fn data(sum: [u8; CHECKSUM_LEN], data: Vec<u8>) -> Result<Self, FrameError> {
        if checksum(&data) != sum {
            return Err(FrameError::Corrupt { len: data.len() });
        }
        Ok(Frame::Data(Bytes::from(data)))
    }
}

/// Bytes of checksum in a data frame.
pub const CHECKSUM_LEN: usize = 8;

/// A data frame's checksum: the first bytes of its data's blake3. QUIC's
/// AEAD protects the frame only from where QUIC takes it; this covers it
/// from the sender's framing to the receiver's, so that a page corrupted in
/// between never reaches CRIU's lazy-pages daemon, which would map it.
pub fn checksum(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut sum = [0u8; CHECKSUM_LEN];
    sum.copy_from_slice(&blake3::hash(data).as_bytes()[..CHECKSUM_LEN]);
    sum
}

/// Bytes of one direction that were sent to the peer and not yet
/// acknowledged, with their position in the whole stream.
#[derive(Debug)]
pub struct ReplayBuffer {
    /// Stream offset of the first kept byte.
    base: u64,
    chunks: VecDeque<Bytes>,
    kept: usize,
    limit: usize,
}

impl ReplayBuffer {
    /// `limit`: most bytes kept; a sender stops reading its source when full.
    pub fn new(limit: usize) -> Self {
        Self {
            base: 0,
            chunks: VecDeque::new(),
            kept: 0,
            limit,
        }
    }

    /// Bytes that may be added before the buffer is full.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.kept)
    }

    /// Stream offset just past the last byte sent.
    pub fn sent(&self) -> u64 {
        self.base + self.kept as u64
    }

    pub fn kept(&self) -> usize {
        self.kept
    }

    pub fn push(&mut self, chunk: Bytes) {
        self.kept += chunk.len();
        self.chunks.push_back(chunk);
    }

    /// Drops what the peer has taken, up to stream offset `acked`.
    pub fn ack(&mut self, acked: u64) -> Result<(), FrameError> {
        if acked > self.sent() {
            return Err(FrameError::AckBeyondSent {
                acked,
                sent: self.sent(),
            });
        }
        let mut drop = acked.saturating_sub(self.base);
        while drop > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if (front.len() as u64) <= drop {
                drop -= front.len() as u64;
                self.kept -= front.len();
                self.base += front.len() as u64;
                self.chunks.pop_front();
            } else {
                let n = drop as usize;
                front.advance(n);
                self.kept -= n;
                self.base += n as u64;
                drop = 0;
            }
        }
        Ok(())
    }

    /// After a reconnect: what to send again, given that the peer has taken
    /// everything before `from`.
    pub fn resend_from(&mut self, from: u64) -> Result<Vec<Bytes>, FrameError> {
        if from < self.base {
            return Err(FrameError::ResumeBeforeKept {
                from,
                kept: self.base,
            });
        }
        self.ack(from)?;
        Ok(self.chunks.iter().cloned().collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn frames_encode_as_documented() {
        let mut data = vec![1, 0, 0, 0, 2];
        data.extend_from_slice(&checksum(b"ab"));
        data.extend_from_slice(b"ab");
        assert_eq!(Frame::Data(Bytes::from_static(b"ab")).encode(), data);
        assert_eq!(Frame::Ack(258).encode(), [2, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(Frame::header_len(1), Ok(4));
        assert_eq!(Frame::header_len(2), Ok(8));
        assert_eq!(Frame::header_len(9), Err(FrameError::UnknownKind(9)));
        assert!(Frame::data_len(((MAX_DATA_FRAME + 1) as u32).to_be_bytes()).is_err());
    }

    #[test]
    fn a_data_frame_changed_after_framing_is_refused() {
        let sum = checksum(b"page");
        assert_eq!(
            Frame::data(sum, b"page".to_vec()),
            Ok(Frame::Data(Bytes::from_static(b"page")))
        );
        assert_eq!(
            Frame::data(sum, b"pagf".to_vec()),
            Err(FrameError::Corrupt { len: 4 })
        );
    }

    #[test]
    fn acks_drop_whole_and_partial_chunks() {
        let mut buf = ReplayBuffer::new(100);
        buf.push(Bytes::from_static(b"0123"));
        buf.push(Bytes::from_static(b"4567"));
        assert_eq!((buf.sent(), buf.kept(), buf.room()), (8, 8, 92));
        buf.ack(6).unwrap();
        assert_eq!(buf.kept(), 2);
        assert_eq!(buf.resend_from(6).unwrap(), vec![Bytes::from_static(b"67")]);
        buf.ack(3).unwrap(); // an old ack changes nothing
        assert_eq!(buf.kept(), 2);
        assert_eq!(
            buf.ack(9),
            Err(FrameError::AckBeyondSent { acked: 9, sent: 8 })
        );
    }

    #[test]
    fn resend_starts_where_the_peer_stopped() {
        let mut buf = ReplayBuffer::new(100);
        for chunk in [&b"abc"[..], b"def", b"ghi"] {
            buf.push(Bytes::copy_from_slice(chunk));
        }
        buf.ack(2).unwrap();
        let again: Vec<u8> = buf
            .resend_from(4)
            .unwrap()
            .iter()
            .flat_map(|b| b.to_vec())
            .collect();
        assert_eq!(again, b"efghi");
        assert_eq!(
            buf.resend_from(1),
            Err(FrameError::ResumeBeforeKept { from: 1, kept: 4 })
        );
    }

    #[test]
    fn room_shrinks_until_acked() {
        let mut buf = ReplayBuffer::new(6);
        buf.push(Bytes::from_static(b"abcdef"));
        assert_eq!(buf.room(), 0);
        buf.ack(6).unwrap();
        assert_eq!(buf.room(), 6);
    }
}
