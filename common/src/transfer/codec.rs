//! How a data stream's bytes are encoded on the wire ([`StreamCodec`]): the
//! sender's encoder and the receiver's decoder for each codec, and a timed
//! sample of zstd on this host for the compression rule
//! ([`super::compression`]).

use std::io::{self, BufReader, Read, Write};
use std::time::{Duration, Instant};

use crate::protocol::StreamCodec;

/// zstd level 1: on a fast link the compressor, not the network, is the
/// bottleneck, and level 1 already removes most of the zero pages in images.
pub const ZSTD_LEVEL: i32 = 1;
/// zstd's window, log2 bytes: what the encoder uses (level 1 would take 2^19
/// by itself) and the most any decoder accepts. A decoder holds a window this
/// large, and the destination decodes up to 128 streams per migration at once:
/// 1 MiB each instead of the 128 MiB a frame may ask of zstd's default decoder.
pub const WINDOW_LOG: u32 = 20;

/// How one stream is encoded by its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The bytes as they are.
    Plain,
    Zstd {
        level: i32,
        /// zstd's worker threads; 1 compresses on the stream's own thread.
        threads: u32,
    },
}

impl Default for Encoding {
    /// What every stream was before the codec could be chosen.
    fn default() -> Self {
        Encoding::Zstd {
            level: ZSTD_LEVEL,
            threads: 1,
        }
    }
}

impl Encoding {
    /// What the stream header says of it.
    pub fn codec(&self) -> StreamCodec {
        match self {
            Encoding::Plain => StreamCodec::None,
            Encoding::Zstd { .. } => StreamCodec::Zstd,
        }
    }
}

/// The sender's side of a stream: what the producer's bytes go through before
/// they reach the channel to the QUIC stream.
pub(super) enum Encoder<W: Write> {
    Plain(W),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    pub(super) fn new(encoding: Encoding, out: W) -> io::Result<Self> {
        match encoding {
            Encoding::Plain => Ok(Encoder::Plain(out)),
            Encoding::Zstd { level, threads } => {
                let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
                encoder.window_log(WINDOW_LOG)?;
                // zstd's own worker threads; with 0 it compresses on the
                // caller's thread, which is what 1 thread means here.
                if threads > 1 {
                    encoder.multithread(threads)?;
                }
                Ok(Encoder::Zstd(encoder))
            }
        }
    }

    /// Ends the encoding (zstd: the frame's last block) and gives back the
    /// writer underneath.
    pub(super) fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(out) => Ok(out),
            Encoder::Zstd(encoder) => encoder.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(out) => out.write(buf),
            Encoder::Zstd(encoder) => encoder.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(out) => out.flush(),
            Encoder::Zstd(encoder) => encoder.flush(),
        }
    }
}

/// The receiver's side of a stream: the header's codec, undone. Whatever the
/// codec, the reader above it ([`super::adapters::HashingReader`]) bounds
/// the decoded bytes by the declared size.
pub(super) enum Decoder<R: Read> {
    Plain(R),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    pub(super) fn new(codec: StreamCodec, input: R) -> io::Result<Self> {
        match codec {
            StreamCodec::None => Ok(Decoder::Plain(input)),
            StreamCodec::Zstd => zstd_decoder(input).map(Decoder::Zstd),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(input) => input.read(buf),
            Decoder::Zstd(decoder) => decoder.read(buf),
        }
    }
}

/// A zstd decoder whose window is bounded by [`WINDOW_LOG`]: a frame that
/// asks for more fails instead of making it allocate.
pub(super) fn zstd_decoder<R: Read>(
    input: R,
) -> io::Result<zstd::stream::read::Decoder<'static, BufReader<R>>> {
    let mut decoder = zstd::stream::read::Decoder::new(input)?;
    decoder.window_log_max(WINDOW_LOG)?;
    Ok(decoder)
}

/// How fast zstd compressed a sample on this host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZstdRate {
    /// Input bytes per second.
    pub bytes_per_s: f64,
    pub level: i32,
    pub threads: u32,
    /// Input bytes per output byte on the sample.
    pub ratio: f64,
}

/// Compresses `sample` once as a stream with `level` and `threads` would,
/// timed. Blocking: a few milliseconds of CPU per MiB.
pub fn measure_zstd(sample: &[u8], level: i32, threads: u32) -> io::Result<ZstdRate> {
    let started = Instant::now();
    let mut encoder = Encoder::new(Encoding::Zstd { level, threads }, Counting::default())?;
    encoder.write_all(sample)?;
    let out = encoder.finish()?;
    // Below a microsecond the clock says nothing: count it as one.
    let secs = started
        .elapsed()
        .max(Duration::from_micros(1))
        .as_secs_f64();
    Ok(ZstdRate {
        bytes_per_s: sample.len() as f64 / secs,
        level,
        threads,
        ratio: sample.len() as f64 / out.bytes.max(1) as f64,
    })
}

/// Counts what is written to it and keeps nothing.
#[derive(Debug, Default)]
struct Counting {
    bytes: u64,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn round_trip(encoding: Encoding, content: &[u8]) -> Vec<u8> {
        let mut encoder = Encoder::new(encoding, Vec::new()).unwrap();
        encoder.write_all(content).unwrap();
        let wire = encoder.finish().unwrap();
        let mut out = Vec::new();
        Decoder::new(encoding.codec(), wire.as_slice())
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn every_encoding_decodes_to_its_input() {
        let content: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        for encoding in [
            Encoding::Plain,
            Encoding::default(),
            Encoding::Zstd {
                level: 3,
                threads: 2,
            },
        ] {
            assert!(round_trip(encoding, &content) == content, "{encoding:?}");
        }
    }

    #[test]
    fn plain_is_the_bytes_themselves() {
        let mut encoder = Encoder::new(Encoding::Plain, Vec::new()).unwrap();
        encoder.write_all(b"pages").unwrap();
        assert_eq!(encoder.finish().unwrap(), b"pages");
    }

    #[test]
    fn a_measured_sample_reports_its_rate_and_ratio() {
        let zeros = vec![0u8; 1 << 20];
        let rate = measure_zstd(&zeros, ZSTD_LEVEL, 1).unwrap();
        assert!(rate.bytes_per_s > 0.0);
        assert!(rate.ratio > 100.0, "{rate:?}");
        assert_eq!((rate.level, rate.threads), (ZSTD_LEVEL, 1));
    }
}
