//! Test builds only (feature `fault-injection`, refused in release builds):
//! corrupts one byte of one data stream after the sender has hashed it and
//! before it is compressed and encrypted, so that the end-to-end tests can
//! show that the receiver's checksum catches a corruption that neither QUIC
//! (which protects only what it is given) nor zstd would.
//!
//! [`FLIP_ENV`] names the stream and the byte: `NAME@OFFSET`, NAME being a
//! stream's name (an image file such as `pages-1.img`, or a layer digest),
//! OFFSET the byte of its uncompressed content to invert (of the whole file
//! for an image sent in segments: only the segment holding it is corrupted).
//!
//! [`RELEASE_DELAY_ENV`] holds the source's release back after its decision.

/// The environment variable the sender reads.
pub const FLIP_ENV: &str = "MIGRATE_FAULT_FLIP";

/// Milliseconds the source waits, after its decision and the end of its
/// copy, before it sends `Release`: so that a test can lose the release (cut
/// the link once the destination holds its copy) without racing it.
pub const RELEASE_DELAY_ENV: &str = "MIGRATE_FAULT_RELEASE_DELAY_MS";

/// The delay [`RELEASE_DELAY_ENV`] asks for, if any.
pub fn release_delay() -> Option<std::time::Duration> {
    let ms = std::env::var(RELEASE_DELAY_ENV).ok()?.parse().ok()?;
    tracing::warn!(ms, "fault injection: holding the release back");
    Some(std::time::Duration::from_millis(ms))
}

/// One byte of one stream to invert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flip {
    pub stream: String,
    pub offset: u64,
}

impl Flip {
    /// Parses `NAME@OFFSET`.
    pub fn parse(spec: &str) -> Option<Self> {
        let (stream, offset) = spec.rsplit_once('@')?;
        Some(Self {
            stream: stream.to_owned(),
            offset: offset.parse().ok()?,
        })
    }

    /// The flip [`FLIP_ENV`] asks of stream `name`, whose content starts at
    /// byte `start` of the file (a segment of a large image), if any: its
    /// offset counted from the stream's start.
    pub fn for_stream(name: &str, start: u64) -> Option<Self> {
        let mut flip = Self::parse(&std::env::var(FLIP_ENV).ok()?)?;
        flip.offset = flip.offset.checked_sub(start)?;
        (flip.stream == name).then(|| {
            tracing::warn!(
                stream = name,
                offset = flip.offset,
                "fault injection: corrupting a byte"
            );
            flip
        })
    }

    /// `buf`, the stream's bytes from offset `at`, with the byte flipped if
    /// it is among them; `None` when it is not.
    pub fn apply(&self, at: u64, buf: &[u8]) -> Option<Vec<u8>> {
        let index = usize::try_from(self.offset.checked_sub(at)?).ok()?;
        let mut flipped = buf.get(..=index)?.to_vec();
        flipped[index] ^= 0xff;
        flipped.extend_from_slice(&buf[index + 1..]);
        Some(flipped)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Flip;

    #[test]
    fn parses_name_and_offset() {
        assert_eq!(
            Flip::parse("pages-1.img@4096"),
            Some(Flip {
                stream: "pages-1.img".into(),
                offset: 4096
            })
        );
        assert_eq!(Flip::parse("pages-1.img"), None);
        assert_eq!(Flip::parse("pages-1.img@x"), None);
    }

    #[test]
    fn flips_only_the_named_byte() {
        let flip = Flip::parse("s@5").unwrap();
        assert_eq!(flip.apply(0, &[0; 4]), None);
        assert_eq!(flip.apply(6, &[0; 4]), None);
        assert_eq!(flip.apply(4, &[1, 2, 3]), Some(vec![1, !2, 3]));
    }
}
