//! Compress only when it pays: whether the frozen step's streams go zstd or
//! as they are, from the link's rate and this host's zstd rate, both
//! measured before the freeze (by the source agent; this is the rule alone).
//!
//! Streams are pipelined (read, encode, send), so a stream goes at the
//! slower of its encoder and the link: compressed, at zstd's input rate (or
//! the link's times the ratio, when the link is slower still); uncompressed,
//! at the link's rate. Compressing is faster exactly when the link is slower
//! than zstd. The frozen step's bytes are mostly one large page file, one
//! stream, so one encoder's rate (with its threads) is the one to compare.
//!
//! Within [`MARGIN`] of each other the two are as fast, and the rates are
//! measured on samples: then the stream goes uncompressed, which leaves the
//! cores to CRIU and to the destination's restore. When the link's rate is
//! unknown the stream is compressed: on a slow link that is worth its ratio
//! (several times on memory images, which are full of zero pages), while on
//! a fast one it costs at most the difference between zstd's rate and the
//! link's.

use super::codec::{Encoding, ZstdRate, ZSTD_LEVEL};

/// How much slower than zstd the link must be for compression to be chosen.
pub const MARGIN: f64 = 1.25;

/// `--compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionChoice {
    /// Decided from the measured rates.
    #[default]
    Auto,
    /// Never compress.
    None,
    /// Always zstd.
    Zstd,
}

/// Where a link rate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRateSource {
    /// Bytes sent before the freeze over the seconds they took.
    Measured,
    /// QUIC's congestion window over its round-trip time: what the path
    /// allowed so far, a lower bound early in a connection.
    PathEstimate,
    /// Uncompressed bytes sent only to measure the link, timed until the
    /// peer acknowledged them ([`crate::transfer::probe`]).
    Probe,
}

/// How fast the link carries a migration's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkRate {
    pub bytes_per_s: f64,
    pub source: LinkRateSource,
}

/// The rule's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Compression {
    pub encoding: Encoding,
    /// One line for people: the rates compared and what came of it.
    pub reason: String,
}

/// Chooses how the frozen step's streams are encoded. `threads` is what
/// zstd gets when it is chosen without a measurement (`--compression zstd`,
/// or nothing measured).
pub fn decide(
    choice: CompressionChoice,
    link: Option<LinkRate>,
    zstd: Option<ZstdRate>,
    threads: u32,
) -> Compression {
    let default_zstd = Encoding::Zstd {
        level: ZSTD_LEVEL,
        threads,
    };
    let (link, zstd) = match (choice, link, zstd) {
        (CompressionChoice::None, _, _) => {
            return Compression {
                encoding: Encoding::Plain,
                reason: "--compression none: not compressing".into(),
            }
        }
        (CompressionChoice::Zstd, _, _) => {
            return Compression {
                encoding: default_zstd,
                reason: format!("--compression zstd: {}", describe(default_zstd)),
            }
        }
        (CompressionChoice::Auto, None, _) => {
            return Compression {
                encoding: default_zstd,
                reason: format!(
                    "link rate unknown: {} (the safe choice on an unknown link)",
                    describe(default_zstd)
                ),
            }
        }
        (CompressionChoice::Auto, Some(_), None) => {
            return Compression {
                encoding: default_zstd,
                reason: format!("zstd's rate unknown: {}", describe(default_zstd)),
            }
        }
        (CompressionChoice::Auto, Some(link), Some(zstd)) => (link, zstd),
    };
    let measured = Encoding::Zstd {
        level: zstd.level,
        threads: zstd.threads,
    };
    let link_said = match link.source {
        LinkRateSource::Measured => format!("link {}", rate(link.bytes_per_s)),
        LinkRateSource::Probe => format!("link {} (probed)", rate(link.bytes_per_s)),
        LinkRateSource::PathEstimate => format!(
            "link ≥ {} (QUIC's path estimate, a lower bound)",
            rate(link.bytes_per_s)
        ),
    };
    let zstd_said = format!("zstd {}", rate(zstd.bytes_per_s));
    if link.bytes_per_s * MARGIN < zstd.bytes_per_s {
        Compression {
            encoding: measured,
            reason: format!("{link_said} < {zstd_said}: {}", describe(measured)),
        }
    } else {
        Compression {
            encoding: Encoding::Plain,
            reason: format!("{link_said} ≥ {zstd_said}/{MARGIN}: not compressing"),
        }
    }
}

/// "zstd level 1, 2 threads".
fn describe(encoding: Encoding) -> String {
    match encoding {
        Encoding::Plain => "not compressing".into(),
        Encoding::Zstd { level, threads } => format!(
            "zstd level {level}, {threads} thread{}",
            if threads == 1 { "" } else { "s" }
        ),
    }
}

/// A rate for people, in decimal units as links are sold.
fn rate(bytes_per_s: f64) -> String {
    if bytes_per_s >= 1e9 {
        format!("{:.1} GB/s", bytes_per_s / 1e9)
    } else if bytes_per_s >= 1e6 {
        format!("{:.0} MB/s", bytes_per_s / 1e6)
    } else {
        format!("{:.0} kB/s", bytes_per_s / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(bytes_per_s: f64) -> Option<LinkRate> {
        Some(LinkRate {
            bytes_per_s,
            source: LinkRateSource::Measured,
        })
    }

    fn zstd(bytes_per_s: f64, threads: u32) -> Option<ZstdRate> {
        Some(ZstdRate {
            bytes_per_s,
            level: 1,
            threads,
            ratio: 3.0,
        })
    }

    #[test]
    fn a_link_faster_than_zstd_gets_the_bytes_as_they_are() {
        let c = decide(CompressionChoice::Auto, link(2.1e9), zstd(0.4e9, 1), 1);
        assert_eq!(c.encoding, Encoding::Plain);
        assert_eq!(
            c.reason,
            "link 2.1 GB/s ≥ zstd 400 MB/s/1.25: not compressing"
        );
    }

    #[test]
    fn a_link_slower_than_zstd_gets_zstd_as_measured() {
        let c = decide(CompressionChoice::Auto, link(100e6), zstd(0.7e9, 2), 1);
        assert_eq!(
            c.encoding,
            Encoding::Zstd {
                level: 1,
                threads: 2
            }
        );
        assert_eq!(
            c.reason,
            "link 100 MB/s < zstd 700 MB/s: zstd level 1, 2 threads"
        );
    }

    #[test]
    fn within_the_margin_nothing_is_compressed() {
        // Slower than zstd, but not by a quarter.
        let c = decide(CompressionChoice::Auto, link(350e6), zstd(400e6, 1), 1);
        assert_eq!(c.encoding, Encoding::Plain);
        let c = decide(CompressionChoice::Auto, link(310e6), zstd(400e6, 1), 1);
        assert_eq!(c.encoding.codec(), crate::protocol::StreamCodec::Zstd);
    }

    #[test]
    fn an_unknown_link_gets_zstd() {
        let c = decide(CompressionChoice::Auto, None, zstd(0.4e9, 1), 2);
        assert_eq!(
            c.encoding,
            Encoding::Zstd {
                level: ZSTD_LEVEL,
                threads: 2
            }
        );
        assert!(
            c.reason.starts_with("link rate unknown: zstd"),
            "{}",
            c.reason
        );
        let c = decide(CompressionChoice::Auto, link(1e9), None, 1);
        assert_eq!(c.encoding.codec(), crate::protocol::StreamCodec::Zstd);
        assert!(c.reason.starts_with("zstd's rate unknown"), "{}", c.reason);
    }

    #[test]
    fn a_path_estimate_says_it_is_a_lower_bound() {
        let c = decide(
            CompressionChoice::Auto,
            Some(LinkRate {
                bytes_per_s: 5e9,
                source: LinkRateSource::PathEstimate,
            }),
            zstd(0.4e9, 1),
            1,
        );
        assert_eq!(c.encoding, Encoding::Plain);
        assert!(c.reason.contains("a lower bound"), "{}", c.reason);
    }

    #[test]
    fn the_users_choice_wins_over_the_rates() {
        let c = decide(CompressionChoice::None, link(1e3), zstd(1e9, 1), 1);
        assert_eq!(c.encoding, Encoding::Plain);
        assert_eq!(c.reason, "--compression none: not compressing");
        let c = decide(CompressionChoice::Zstd, link(1e12), zstd(1e6, 1), 2);
        assert_eq!(
            c.encoding,
            Encoding::Zstd {
                level: ZSTD_LEVEL,
                threads: 2
            }
        );
        assert_eq!(c.reason, "--compression zstd: zstd level 1, 2 threads");
    }

    #[test]
    fn rates_read_in_decimal_units() {
        assert_eq!(rate(2.14e9), "2.1 GB/s");
        assert_eq!(rate(370e6), "370 MB/s");
        assert_eq!(rate(12_345.0), "12 kB/s");
    }
}
