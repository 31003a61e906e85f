//! The two rates the compression rule compares
//! ([`migrate_common::transfer::compression`]), measured before the freeze:
//! the link's, from what the migration already sent (or QUIC's estimate of
//! its path), and this host's zstd rate on a sample of the container's own
//! memory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use migrate_common::transfer::codec::{measure_zstd, Encoding, ZstdRate};
use migrate_common::transfer::compression::{self, CompressionChoice, LinkRate, LinkRateSource};
use migrate_common::transfer::{probe, ZSTD_LEVEL};

use crate::report::CompressionReport;

/// A phase's bytes count toward the link's rate from this size on: below it
/// a stream's time is mostly round trips and slow start, not bytes.
pub const MEANINGFUL_BYTES: u64 = 8 << 20;
/// Bytes zstd compresses, timed, for its rate.
const SAMPLE_BYTES: usize = 8 << 20;
/// A page of memory.
const PAGE: usize = 4096;

/// How the streams before the freeze are encoded: zstd on one thread per
/// stream (several run at once, and the container runs too), unless the
/// user said no compression.
pub fn before_freeze(choice: CompressionChoice) -> Encoding {
    match choice {
        CompressionChoice::None => Encoding::Plain,
        CompressionChoice::Auto | CompressionChoice::Zstd => Encoding::default(),
    }
}

/// The frozen step's encoding: the rule, on the rates measured now (auto),
/// or the user's choice; and what to report of it.
pub async fn frozen_step(
    choice: CompressionChoice,
    samples: &LinkSamples,
    conn: &quinn::Connection,
    round_dir: Option<PathBuf>,
) -> (Encoding, CompressionReport) {
    let threads = UNMEASURED_ZSTD_THREADS;
    let (link, probed, zstd) = if choice == CompressionChoice::Auto {
        // Streams compressed before the freeze carry what zstd gives them,
        // not what the link could: the probe asks the link itself.
        let probed = match probe::send_probe(conn, probe::PROBE_BYTES).await {
            Ok(bytes_per_s) => Some(bytes_per_s),
            Err(e) => {
                tracing::warn!(error = %e, "probing the link");
                None
            }
        };
        let link = link_rate(samples, &conn.stats().path, probed);
        let zstd = tokio::task::spawn_blocking(move || zstd_rate(round_dir.as_deref()))
            .await
            .ok()
            .flatten();
        (link, probed, zstd)
    } else {
        (None, None, None)
    };
    let decided = compression::decide(choice, link, zstd.map(|(rate, _)| rate), threads);
    let (level, threads) = match decided.encoding {
        Encoding::Plain => (None, None),
        Encoding::Zstd { level, threads } => (Some(level), Some(threads)),
    };
    let report = CompressionReport {
        requested: choice_name(choice),
        codec: match decided.encoding {
            Encoding::Plain => "none",
            Encoding::Zstd { .. } => "zstd",
        },
        level,
        threads,
        link_bytes_per_s: link.map(|l| l.bytes_per_s),
        link_rate_source: link.map(|l| match l.source {
            LinkRateSource::Measured => "measured",
            LinkRateSource::PathEstimate => "path-estimate",
            LinkRateSource::Probe => "probe",
        }),
        link_probe_bytes_per_s: probed,
        zstd_bytes_per_s: zstd.map(|(rate, _)| rate.bytes_per_s),
        zstd_sample: zstd.map(|(_, what)| what),
        reason: decided.reason,
    };
    (decided.encoding, report)
}

pub fn choice_name(choice: CompressionChoice) -> &'static str {
    match choice {
        CompressionChoice::Auto => "auto",
        CompressionChoice::None => "none",
        CompressionChoice::Zstd => "zstd",
    }
}

/// One phase's sending, timed: the wire bytes and seconds from
/// [`Sending::start`] to [`Sending::end`].
#[derive(Debug)]
pub struct Sending {
    started: Instant,
    wire_before: u64,
}

impl Sending {
    pub fn start(conn: &quinn::Connection) -> Self {
        Self {
            started: Instant::now(),
            wire_before: conn.stats().udp_tx.bytes,
        }
    }

    pub fn end(self, conn: &quinn::Connection, samples: &mut LinkSamples) {
        let wire = conn.stats().udp_tx.bytes.saturating_sub(self.wire_before);
        samples.record(wire, self.started.elapsed());
    }
}

/// What the phases before the freeze carried on the link, and how long they
/// took.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkSamples {
    wire_bytes: u64,
    secs: f64,
}

impl LinkSamples {
    /// Counts a phase (layers, the upper dir, a pre-copy round) that sent
    /// `wire_bytes` in `took`, if it is large enough to say something.
    pub fn record(&mut self, wire_bytes: u64, took: Duration) {
        if wire_bytes >= MEANINGFUL_BYTES && !took.is_zero() {
            self.wire_bytes += wire_bytes;
            self.secs += took.as_secs_f64();
        }
    }

    fn bytes_per_s(&self) -> Option<f64> {
        (self.wire_bytes > 0).then(|| self.wire_bytes as f64 / self.secs)
    }
}

/// The link's rate: a probe's (`probed`), which timed uncompressed bytes
/// through QUIC itself, its packet and crypto work on both hosts included;
/// without one, the higher of what the phases before the freeze carried and
/// QUIC's path estimate (congestion window over smoothed round trip), both
/// lower bounds. The estimate is no measure of what the hosts can push: on
/// a veth with a round trip of microseconds it said 20 GB/s where the probe
/// moved 332 MB/s, and taking the higher of the two sent 512 MiB
/// uncompressed at that pace. None when none says anything.
pub fn link_rate(
    samples: &LinkSamples,
    path: &quinn::PathStats,
    probed: Option<f64>,
) -> Option<LinkRate> {
    let measured = samples.bytes_per_s().map(|bytes_per_s| LinkRate {
        bytes_per_s,
        source: LinkRateSource::Measured,
    });
    let rtt = path.rtt.as_secs_f64();
    let estimate = (rtt > 0.0 && path.cwnd > 0).then(|| LinkRate {
        bytes_per_s: path.cwnd as f64 / rtt,
        source: LinkRateSource::PathEstimate,
    });
    let probe = probed
        .filter(|bytes_per_s| bytes_per_s.is_finite() && *bytes_per_s > 0.0)
        .map(|bytes_per_s| LinkRate {
            bytes_per_s,
            source: LinkRateSource::Probe,
        });
    probe.or_else(|| {
        [measured, estimate]
            .into_iter()
            .flatten()
            .max_by(|a, b| a.bytes_per_s.total_cmp(&b.bytes_per_s))
    })
}

/// zstd's threads when it is not measured (`--compression zstd`): one. On a
/// 2-core host running both ends, two threads compressed 64 MiB of
/// [`memory_like_sample`] about 14% faster alone (641 against 732 MB/s,
/// means of six runs) and the destination's decoder and QUIC want those
/// cores too; [`zstd_rate`] measures both where it can choose.
pub const UNMEASURED_ZSTD_THREADS: u32 = 1;
/// How much faster multithreaded zstd must be on the sample to be used: it
/// takes cores the dump, QUIC and the other streams share.
const MULTITHREAD_GAIN: f64 = 1.2;

/// zstd's rate on this host, on up to [`SAMPLE_BYTES`] of the largest image
/// file in `round_dir` (the last pre-copy round: the container's own
/// memory), else on memory-like content (zero, text and random pages); with
/// one thread, and with one per core where that is clearly faster.
/// Blocking. None when zstd itself failed, which the rule takes as unknown.
pub fn zstd_rate(round_dir: Option<&Path>) -> Option<(ZstdRate, &'static str)> {
    let (sample, what) = match round_dir
        .and_then(largest_file)
        .and_then(|p| read_sample(&p))
    {
        Some(sample) => (sample, "the container's memory"),
        None => (memory_like_sample(), "a memory-like sample"),
    };
    let cores = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(1))
        .unwrap_or(1);
    let measured = measure_zstd(&sample, ZSTD_LEVEL, 1).and_then(|single| {
        if cores < 2 {
            return Ok(single);
        }
        let multi = measure_zstd(&sample, ZSTD_LEVEL, cores)?;
        Ok(faster(single, multi))
    });
    match measured {
        Ok(rate) => Some((rate, what)),
        Err(e) => {
            tracing::warn!(error = %e, "measuring zstd");
            None
        }
    }
}

/// Multithreaded zstd only when it is worth its cores.
fn faster(single: ZstdRate, multi: ZstdRate) -> ZstdRate {
    if multi.bytes_per_s >= single.bytes_per_s * MULTITHREAD_GAIN {
        multi
    } else {
        single
    }
}

fn largest_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| (meta.len(), e.path()))
        })
        .max_by_key(|(len, _)| *len)
        .filter(|(len, _)| *len >= SAMPLE_BYTES as u64 / 8)
        .map(|(_, path)| path)
}

fn read_sample(path: &Path) -> Option<Vec<u8>> {
    let mut sample = Vec::with_capacity(SAMPLE_BYTES);
    std::fs::File::open(path)
        .ok()?
        .take(SAMPLE_BYTES as u64)
        .read_to_end(&mut sample)
        .ok()?;
    Some(sample)
}

/// Pages as a process's heap holds them: half zero, a quarter of words and
/// numbers, a quarter random. Fixed: the same sample on every host.
fn memory_like_sample() -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"user ",
        b"order ",
        b"item ",
        b"price ",
        b"status ",
        b"42 ",
        b"request ",
        b"1970 ",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut sample = vec![0u8; SAMPLE_BYTES];
    for page in sample.chunks_exact_mut(PAGE) {
        match next() % 4 {
            0 | 1 => {}
            2 => {
                let mut at = 0;
                while at < PAGE {
                    let word = WORDS[(next() % 8) as usize];
                    let n = word.len().min(PAGE - at);
                    page[at..at + n].copy_from_slice(&word[..n]);
                    at += n;
                }
            }
            _ => {
                for chunk in page.chunks_exact_mut(8) {
                    chunk.copy_from_slice(&next().to_le_bytes());
                }
            }
        }
    }
    sample
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_decides_the_link_rate_else_the_highest_lower_bound() {
        let mut path = quinn::PathStats::default();
        path.rtt = Duration::from_millis(1);
        path.cwnd = 100_000; // 100 MB/s
        let mut samples = LinkSamples::default();
        samples.record(50 << 20, Duration::from_secs(1)); // 52 MB/s
        let probed = link_rate(&samples, &path, Some(30e6)).unwrap();
        assert_eq!(probed.source, LinkRateSource::Probe);
        assert_eq!(probed.bytes_per_s, 30e6);
        let estimated = link_rate(&samples, &path, Some(f64::NAN)).unwrap();
        assert_eq!(estimated.source, LinkRateSource::PathEstimate);
        let measured = link_rate(&samples, &quinn::PathStats::default(), None).unwrap();
        assert_eq!(measured.source, LinkRateSource::Measured);
        assert!(link_rate(&LinkSamples::default(), &quinn::PathStats::default(), None).is_none());
    }

    #[test]
    fn only_meaningful_phases_count_toward_the_link_rate() {
        let mut samples = LinkSamples::default();
        samples.record(1 << 20, Duration::from_secs(10));
        assert_eq!(samples.bytes_per_s(), None);
        samples.record(100 << 20, Duration::from_secs(1));
        samples.record(100 << 20, Duration::from_secs(3));
        assert_eq!(samples.bytes_per_s(), Some((50 << 20) as f64));
    }

    #[test]
    fn the_memory_like_sample_compresses_as_memory_does() {
        let sample = memory_like_sample();
        assert_eq!(sample.len(), SAMPLE_BYTES);
        let zeros = sample
            .chunks_exact(PAGE)
            .filter(|p| p.iter().all(|&b| b == 0));
        let share = zeros.count() as f64 / (SAMPLE_BYTES / PAGE) as f64;
        assert!((0.4..0.6).contains(&share), "{share}");
        let rate = measure_zstd(&sample, ZSTD_LEVEL, 1).unwrap();
        assert!((1.5..4.0).contains(&rate.ratio), "{rate:?}");
    }

    #[test]
    fn the_sample_is_the_largest_image_when_there_is_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("small.img"), [1u8; 10]).unwrap();
        std::fs::write(dir.path().join("pages-1.img"), vec![0u8; 2 << 20]).unwrap();
        let (rate, what) = zstd_rate(Some(dir.path())).unwrap();
        assert_eq!(what, "the container's memory");
        assert!(rate.ratio > 100.0, "{rate:?}");
        let empty = tempfile::tempdir().unwrap();
        let (_, what) = zstd_rate(Some(empty.path())).unwrap();
        assert_eq!(what, "a memory-like sample");
    }

    #[test]
    fn more_threads_only_when_clearly_faster() {
        let rate = |bytes_per_s, threads| ZstdRate {
            bytes_per_s,
            level: 1,
            threads,
            ratio: 3.0,
        };
        assert_eq!(faster(rate(100.0, 1), rate(115.0, 2)).threads, 1);
        assert_eq!(faster(rate(100.0, 1), rate(150.0, 2)).threads, 2);
    }
}
