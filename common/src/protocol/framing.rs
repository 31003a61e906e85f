//! Length-prefixed prost frames: a 4-byte big-endian length, then the encoded
//! message. The length is checked against [`MAX_FRAME_LEN`] before anything is
//! allocated, so a hostile or confused peer cannot make us buffer gigabytes,
//! and the buffer grows only with the bytes that actually arrive.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest control frame accepted. The biggest legitimate message is `Hello`,
/// which carries the container's config.json (tens of KiB in practice).
pub const MAX_FRAME_LEN: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended inside a frame (after {got} of {expected} bytes)")]
    Torn { got: usize, expected: usize },
    #[error("malformed frame")]
    Decode(#[from] prost::DecodeError),
    #[error("I/O on the stream")]
    Io(#[from] std::io::Error),
}

/// Writes one frame. The caller decides when to flush or finish the stream.
pub async fn write_frame<W, M>(out: &mut W, msg: &M) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    let len = msg.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    out.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames;
/// an end inside a frame is [`FrameError::Torn`].
pub async fn read_frame<R, M>(input: &mut R) -> Result<Option<M>, FrameError>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    read_frame_within(input, MAX_FRAME_LEN).await
}

/// [`read_frame`] with a tighter bound than [`MAX_FRAME_LEN`]: for a peer
/// that is only told why it is refused, whose message is read for its kind.
pub async fn read_frame_within<R, M>(input: &mut R, max: usize) -> Result<Option<M>, FrameError>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    let max = max.min(MAX_FRAME_LEN);
    let mut len_buf = [0u8; 4];
    let got = read_up_to(input, &mut len_buf).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < len_buf.len() {
        return Err(FrameError::Torn {
            got,
            expected: len_buf.len(),
        });
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // The buffer grows with what arrives, not with what the prefix claims: four
    // bytes must not make us hold megabytes.
    let mut body = Vec::with_capacity(len.min(FIRST_READ));
    let got = input.take(len as u64).read_to_end(&mut body).await?;
    if got < len {
        return Err(FrameError::Torn { got, expected: len });
    }
    Ok(Some(M::decode(body.as_slice())?))
}

/// What a frame's buffer starts at: most frames fit.
const FIRST_READ: usize = 64 << 10;

/// Fills `buf` unless the stream ends first; returns how much was read.
async fn read_up_to<R: AsyncRead + Unpin>(
    input: &mut R,
    buf: &mut [u8],
) -> Result<usize, std::io::Error> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = input.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::messages::{Abort, ControlMessage};

    fn abort(reason: &str) -> ControlMessage {
        ControlMessage::from(Abort {
            reason: reason.into(),
        })
    }

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &abort("one")).await.unwrap();
        write_frame(&mut wire, &abort("two")).await.unwrap();
        let mut input = wire.as_slice();
        let first: ControlMessage = read_frame(&mut input).await.unwrap().unwrap();
        let second: ControlMessage = read_frame(&mut input).await.unwrap().unwrap();
        assert_eq!(first, abort("one"));
        assert_eq!(second, abort("two"));
        assert!(read_frame::<_, ControlMessage>(&mut input)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn torn_frame_is_an_error() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &abort("cut short")).await.unwrap();
        for cut in [1, 3, 5, wire.len() - 1] {
            let mut input = &wire[..cut];
            let err = read_frame::<_, ControlMessage>(&mut input)
                .await
                .unwrap_err();
            assert!(
                matches!(err, FrameError::Torn { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let wire = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let mut input = wire.as_slice();
        let err = read_frame::<_, ControlMessage>(&mut input)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[tokio::test]
    async fn oversized_message_is_not_written() {
        let huge = abort(&"x".repeat(MAX_FRAME_LEN));
        let mut wire = Vec::new();
        let err = write_frame(&mut wire, &huge).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert!(wire.is_empty());
    }

    #[tokio::test]
    async fn garbage_body_is_a_decode_error() {
        let mut wire = 3u32.to_be_bytes().to_vec();
        wire.extend_from_slice(&[0xff, 0xff, 0xff]);
        let mut input = wire.as_slice();
        let err = read_frame::<_, ControlMessage>(&mut input)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)));
    }
}
