//! A link probe: bytes sent as they are on a stream of their own and timed
//! until the peer has acknowledged the last of them. It is the compression
//! rule's link rate when nothing sent before the freeze measured the link
//! (what a zstd-compressed stream carries per second is zstd's rate on a
//! fast link, not the link's), at the cost of a fraction of a second of
//! total time, none of the downtime.

use std::time::Instant;

use bytes::Bytes;

use super::{TransferError, CHUNK};
use crate::protocol::{write_frame, StreamCodec, StreamHeader, StreamKind};

/// What a probe sends: enough for the congestion window to open on a fast
/// link, 0.27 s at 1 Gbit/s.
pub const PROBE_BYTES: u64 = 32 << 20;
/// The most a destination takes on a probe stream (one per migration).
pub const MAX_PROBE_BYTES: u64 = 64 << 20;

/// Sends `bytes` zero bytes uncompressed and returns the link's rate in
/// bytes per second, from the first write to the peer's acknowledgement of
/// the last byte.
pub async fn send_probe(conn: &quinn::Connection, bytes: u64) -> Result<f64, TransferError> {
    let name = "the link probe".to_owned();
    let mut send = conn.open_uni().await.map_err(TransferError::Open)?;
    let header = StreamHeader {
        kind: StreamKind::Probe as i32,
        declared_bytes: bytes,
        codec: StreamCodec::None as i32,
        ..StreamHeader::default()
    };
    let started = Instant::now();
    write_frame(&mut send, &header).await?;
    let zeros = Bytes::from(vec![0u8; CHUNK]);
    let mut left = bytes;
    while left > 0 {
        let len = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        send.write_chunk(zeros.slice(..len))
            .await
            .map_err(|source| TransferError::Write {
                name: name.clone(),
                source,
            })?;
        left -= len as u64;
    }
    send.finish().map_err(|_| TransferError::Write {
        name: name.clone(),
        source: quinn::WriteError::ClosedStream,
    })?;
    match send.stopped().await {
        Ok(None) => {}
        Ok(Some(code)) => {
            return Err(TransferError::Write {
                name,
                source: quinn::WriteError::Stopped(code),
            })
        }
        Err(quinn::StoppedError::ConnectionLost(e)) => {
            return Err(TransferError::Write {
                name,
                source: quinn::WriteError::ConnectionLost(e),
            })
        }
        Err(quinn::StoppedError::ZeroRttRejected) => {
            return Err(TransferError::Write {
                name,
                source: quinn::WriteError::ZeroRttRejected,
            })
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    Ok(bytes as f64 / secs)
}
