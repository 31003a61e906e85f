//! What a migration reports: one summary, printed as text or as one JSON
//! object, with a line per memory round (pre-dump rounds and the final or
//! lazy dump) so that the convergence rule's inputs and the real downtime
//! can be read side by side.

use std::fmt::Write as _;
use std::time::Duration;

use humantime::FormattedDuration;
use indicatif::HumanBytes;
use migrate_common::criu::stats::DumpStats;
use serde::Serialize;

use crate::convergence::{Decision, Verdict};

/// One memory round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// 1, 2, ... for pre-dumps; the final dump comes last.
    pub round: u32,
    /// "pre-dump", "final" (the frozen dump with all that is left) or
    /// "lazy" (the frozen dump without memory, for post-copy).
    pub kind: &'static str,
    pub pages_written: u64,
    /// Pages unchanged since the previous round, not written again.
    pub pages_skipped: u64,
    /// Pages left for the destination to fetch after the restore.
    pub pages_lazy: u64,
    /// Uncompressed bytes of the round's images (final: and the rootfs
    /// changes).
    pub bytes_raw: u64,
    /// UDP payload the source sent for the round.
    pub bytes_wire: u64,
    /// Of `bytes_raw`, what went while CRIU was still dumping (the final
    /// dump's page files follow CRIU as it writes them).
    pub bytes_raw_during_dump: u64,
    /// Seconds CRIU took to dump, and to send what it wrote.
    pub dump_s: f64,
    pub transfer_s: f64,
    /// Downtime the rule predicted if the container froze after this round.
    pub predicted_downtime_ms: Option<f64>,
    pub dirty_pages_per_s: Option<f64>,
    pub link_bytes_per_s: Option<f64>,
    /// What the rule decided after the round (pre-dumps only).
    pub decision: Option<Decision>,
}

impl RoundReport {
    #[allow(clippy::too_many_arguments)]
    pub fn pre_dump(
        round: u32,
        criu: &DumpStats,
        bytes_raw: u64,
        bytes_wire: u64,
        dump_ms: f64,
        transfer_ms: f64,
        verdict: &Verdict,
    ) -> Self {
        Self {
            round,
            kind: "pre-dump",
            pages_written: criu.pages_written,
            pages_skipped: criu.pages_skipped_parent,
            pages_lazy: 0,
            bytes_raw,
            bytes_wire,
            bytes_raw_during_dump: 0,
            dump_s: dump_ms / 1000.0,
            transfer_s: transfer_ms / 1000.0,
            predicted_downtime_ms: verdict.predicted_downtime_ms,
            dirty_pages_per_s: verdict.dirty_pages_per_s,
            link_bytes_per_s: verdict.link_bytes_per_s,
            decision: Some(verdict.decision),
        }
    }

    /// One line for the progress display and the text summary.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{:>2} {:<8} {:>8} written {:>8} skipped {:>10} raw {:>10} wire  dump {:>9} send {:>9}",
            self.round,
            self.kind,
            self.pages_written,
            self.pages_skipped,
            HumanBytes(self.bytes_raw).to_string(),
            HumanBytes(self.bytes_wire).to_string(),
            secs(self.dump_s).to_string(),
            secs(self.transfer_s).to_string()
        );
        if self.bytes_raw_during_dump > 0 {
            let during = HumanBytes(self.bytes_raw_during_dump);
            let _ = write!(line, "  {during} sent while dumping");
        }
        if self.pages_lazy > 0 {
            let _ = write!(line, "  {} pages follow", self.pages_lazy);
        }
        if let Some(p) = self.predicted_downtime_ms {
            let _ = write!(line, "  predicted downtime {}", secs(p / 1000.0));
        }
        if let Some(d) = self.decision {
            let _ = write!(line, "  → {}", d.explain());
        }
        line
    }
}

/// The mode a migration used, and why.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub requested: &'static str,
    pub used: &'static str,
    pub reason: String,
}

/// How the frozen step's streams were encoded (`--compression`), with the
/// rates the rule compared (auto only; else null).
#[derive(Debug, Clone, Serialize)]
pub struct CompressionReport {
    /// auto, none or zstd.
    pub requested: &'static str,
    /// zstd or none.
    pub codec: &'static str,
    pub level: Option<i32>,
    pub threads: Option<u32>,
    /// Bytes per second; what it is a measure of in `link_rate_source`.
    pub link_bytes_per_s: Option<f64>,
    /// "probe", "measured" (what was sent before the freeze) or
    /// "path-estimate" (QUIC's congestion window over its round-trip time):
    /// the highest of them.
    pub link_rate_source: Option<&'static str>,
    /// What the link probe alone measured, bytes per second.
    pub link_probe_bytes_per_s: Option<f64>,
    /// zstd's input bytes per second on this host.
    pub zstd_bytes_per_s: Option<f64>,
    /// What zstd was timed on.
    pub zstd_sample: Option<&'static str>,
    pub reason: String,
}

/// The result of a successful migration.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub container: String,
    pub destination: String,
    pub mode: ModeReport,
    /// From the freeze to the destination reporting its copy released and
    /// running, in every mode.
    pub downtime_ms: u64,
    /// What the convergence rule predicted for it (pre-copy, hybrid).
    pub predicted_downtime_ms: Option<f64>,
    pub total_ms: u64,
    /// Freeze to the final images complete.
    pub dump_ms: u64,
    /// Images complete to the destination running the container (transfer,
    /// verification, restore, the decision and the release).
    pub transfer_and_restore_ms: u64,
    /// The destination's `runc restore` up to the hold.
    pub restore_ms: u64,
    /// From the destination's release of its held copy to its running.
    pub release_ms: u64,
    /// Post-copy: from the restore to the last page on the destination.
    pub pages_after_restore_ms: Option<u64>,
    /// Post-copy: from the freeze to the original's removal from the source,
    /// when the source was free of it.
    pub source_free_ms: Option<u64>,
    pub rounds: Vec<RoundReport>,
    /// How the frozen step's streams were encoded, and why.
    pub compression: CompressionReport,
    /// `--max-bandwidth`, bytes per second (null: no cap).
    pub max_bandwidth: Option<u64>,
    /// Uncompressed bytes of layers, images and the rootfs.
    pub bytes_raw: u64,
    /// The same on the data streams: after zstd where compressed.
    pub bytes_compressed: u64,
    /// Post-copy: page-server bytes relayed each way, uncompressed.
    pub bytes_pages: u64,
    /// UDP payload bytes every QUIC connection of the migration carried,
    /// both directions (QUIC and TLS overhead and the control stream
    /// included).
    pub bytes_wire: u64,
    pub layers_sent: usize,
    pub layers_reused: usize,
    /// Lower layers hashed to identify them, not found unchanged in the
    /// digest cache (`<state-dir>/layer-digests.json`).
    pub layers_hashed: usize,
    pub files: usize,
    /// Connections replaced during the page transfer.
    pub reconnects: u32,
    /// Cleanup steps that failed after the container was already running on
    /// the destination.
    pub warnings: Vec<String>,
}

impl Summary {
    pub fn human(&self) -> String {
        let mut out = String::new();
        let ratio = if self.bytes_compressed > 0 {
            self.bytes_raw as f64 / self.bytes_compressed as f64
        } else {
            1.0
        };
        let _ = writeln!(out, "migrated {} to {}", self.container, self.destination);
        let _ = writeln!(out, "  mode      {} ({})", self.mode.used, self.mode.reason);
        for round in &self.rounds {
            let _ = writeln!(out, "  round    {}", round.line());
        }
        let predicted = self
            .predicted_downtime_ms
            .map(|p| format!(", {} predicted", secs(p / 1000.0)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  downtime  {} (freeze to running on the destination{predicted})",
            ms(self.downtime_ms)
        );
        let _ = writeln!(
            out,
            "            dump {}, transfer+restore {} (restore {}, release {})",
            ms(self.dump_ms),
            ms(self.transfer_and_restore_ms),
            ms(self.restore_ms),
            ms(self.release_ms)
        );
        if let (Some(pages), Some(free)) = (self.pages_after_restore_ms, self.source_free_ms) {
            let _ = writeln!(
                out,
                "  memory    every page on the destination {} after the restore; source free {} after the freeze",
                ms(pages),
                ms(free)
            );
        }
        let _ = writeln!(out, "  total     {}", ms(self.total_ms));
        let _ = writeln!(out, "  compress  {}", self.compression.reason);
        if let Some(cap) = self.max_bandwidth {
            let _ = writeln!(out, "  cap       {}/s (--max-bandwidth)", HumanBytes(cap));
        }
        let _ = writeln!(
            out,
            "  data      {} raw, {} compressed ({ratio:.1}x), {} of pages relayed, {} on the wire, {} files",
            HumanBytes(self.bytes_raw),
            HumanBytes(self.bytes_compressed),
            HumanBytes(self.bytes_pages),
            HumanBytes(self.bytes_wire),
            self.files
        );
        if self.reconnects > 0 {
            let _ = writeln!(
                out,
                "  link      lost and resumed {} time(s) during the page transfer",
                self.reconnects
            );
        }
        let _ = write!(
            out,
            "  layers    {} sent, {} already on the destination, {} hashed here",
            self.layers_sent, self.layers_reused, self.layers_hashed
        );
        for warning in &self.warnings {
            let _ = write!(out, "\n  warning   {warning}");
        }
        out
    }
}

/// A figure in milliseconds, for people.
fn ms(v: u64) -> FormattedDuration {
    humantime::format_duration(Duration::from_millis(v))
}

/// A figure in seconds, for people: to the millisecond, which is all the
/// measurements are good for.
fn secs(v: f64) -> FormattedDuration {
    ms((v.max(0.0) * 1000.0).round() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            container: "c1".into(),
            destination: "h:1".into(),
            mode: ModeReport {
                requested: "auto",
                used: "pre-copy",
                reason: "auto: pre-copy".into(),
            },
            downtime_ms: 1,
            predicted_downtime_ms: Some(2.5),
            total_ms: 2,
            dump_ms: 3,
            transfer_and_restore_ms: 4,
            restore_ms: 5,
            release_ms: 1,
            pages_after_restore_ms: None,
            source_free_ms: None,
            rounds: vec![RoundReport {
                round: 1,
                kind: "pre-dump",
                pages_written: 100,
                pages_skipped: 0,
                pages_lazy: 0,
                bytes_raw: 409600,
                bytes_wire: 1000,
                bytes_raw_during_dump: 0,
                dump_s: 0.5,
                transfer_s: 0.25,
                predicted_downtime_ms: None,
                dirty_pages_per_s: None,
                link_bytes_per_s: Some(4000.0),
                decision: Some(Decision::AnotherRound),
            }],
            compression: CompressionReport {
                requested: "auto",
                codec: "none",
                level: None,
                threads: None,
                link_bytes_per_s: Some(2.1e9),
                link_rate_source: Some("measured"),
                link_probe_bytes_per_s: None,
                zstd_bytes_per_s: Some(4e8),
                zstd_sample: Some("a memory-like sample"),
                reason: "link 2.1 GB/s ≥ zstd 400 MB/s/1.25: not compressing".into(),
            },
            max_bandwidth: Some(20 << 20),
            bytes_raw: 6,
            bytes_compressed: 11,
            bytes_pages: 0,
            bytes_wire: 7,
            layers_sent: 8,
            layers_reused: 9,
            layers_hashed: 1,
            files: 10,
            reconnects: 0,
            warnings: vec!["w1".into()],
        }
    }

    #[test]
    fn summary_serialises_every_figure() {
        let s = summary();
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(v["downtime_ms"], 1);
        assert_eq!(v["bytes_wire"], 7);
        assert_eq!(v["mode"]["used"], "pre-copy");
        assert_eq!(v["mode"]["reason"], "auto: pre-copy");
        assert_eq!(v["rounds"][0]["pages_written"], 100);
        assert_eq!(v["rounds"][0]["decision"], "another-round");
        assert_eq!(v["warnings"][0], "w1");
        assert_eq!(v["layers_hashed"], 1);
        assert_eq!(v["compression"]["codec"], "none");
        assert_eq!(v["compression"]["threads"], serde_json::Value::Null);
        assert_eq!(v["compression"]["link_bytes_per_s"], 2.1e9);
        assert_eq!(v["max_bandwidth"], 20 << 20);
        let text = s.human();
        assert!(text.contains("compress  link 2.1 GB/s"), "{text}");
        assert!(text.contains("cap       20.00 MiB/s"), "{text}");
        assert!(text.contains("warning   w1"), "{text}");
        assert!(text.contains("3ms predicted"), "{text}");
        assert!(text.contains("dump     500ms send     250ms"), "{text}");
        assert!(text.contains("another round"), "{text}");
    }

    #[test]
    fn formats_durations() {
        assert_eq!(ms(812).to_string(), "812ms");
        assert_eq!(ms(72_345).to_string(), "1m 12s 345ms");
        assert_eq!(secs(0.123_456_7).to_string(), "123ms");
    }
}
