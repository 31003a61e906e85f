//! What the user sees: phases and bytes while it runs (indicatif, on a
//! terminal only), and the summary at the end (text or one JSON object).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use migrate_common::transfer::TransferStats;
use serde::Serialize;

#[derive(Debug)]
pub struct Reporter {
    bar: Option<ProgressBar>,
    /// Plain phase lines on stderr when there is no bar and no JSON.
    log_phases: bool,
}

impl Reporter {
    /// `interactive`: stderr is a terminal and the user did not ask for JSON.
    pub fn new(interactive: bool, json: bool) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} {binary_bytes} {binary_bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            log_phases: bar.is_none() && !json,
            bar,
        }
    }

    pub fn phase(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(bar) => bar.set_message(msg),
            None if self.log_phases => eprintln!("migrate: {msg}"),
            None => {}
        }
    }

    /// Keeps the bar's byte count in step with `stats` until the returned
    /// task is dropped or the reporter finishes.
    pub fn track(&self, stats: Arc<TransferStats>) -> Option<tokio::task::JoinHandle<()>> {
        let bar = self.bar.clone()?;
        Some(tokio::spawn(async move {
            loop {
                bar.set_position(stats.raw_bytes());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }))
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The result of a successful migration.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub container: String,
    pub destination: String,
    /// From CRIU freezing the container to the destination reporting it
    /// running.
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// Freeze to images complete.
    pub dump_ms: u64,
    /// Images complete to every file verified by the destination and
    /// restored (includes the destination's restore).
    pub transfer_and_restore_ms: u64,
    /// The destination's `runc restore` alone.
    pub restore_ms: u64,
    /// Uncompressed bytes of layers, images and the upper dir.
    pub bytes_raw: u64,
    /// The same after zstd.
    pub bytes_compressed: u64,
    /// UDP payload bytes the migration's QUIC connection carried, both
    /// directions (QUIC and TLS overhead and the control stream included).
    pub bytes_wire: u64,
    pub layers_sent: usize,
    pub layers_reused: usize,
    pub files: usize,
    pub mode: &'static str,
    /// Whether this host's kernel could do iterative pre-dumps.
    pub pre_copy_available: bool,
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
        let _ = writeln!(
            out,
            "  downtime  {} (freeze to running on the destination)",
            ms(self.downtime_ms)
        );
        let _ = writeln!(
            out,
            "            dump {}, transfer+restore {} (restore {})",
            ms(self.dump_ms),
            ms(self.transfer_and_restore_ms),
            ms(self.restore_ms)
        );
        let _ = writeln!(out, "  total     {}", ms(self.total_ms));
        let _ = writeln!(
            out,
            "  data      {} raw, {} compressed ({ratio:.1}x), {} on the wire, {} files",
            bytes(self.bytes_raw),
            bytes(self.bytes_compressed),
            bytes(self.bytes_wire),
            self.files
        );
        let _ = writeln!(
            out,
            "  layers    {} sent, {} already on the destination",
            self.layers_sent, self.layers_reused
        );
        let _ = write!(
            out,
            "  mode      {}{}",
            self.mode,
            if self.pre_copy_available {
                ""
            } else {
                " (iterative pre-copy unavailable: this kernel has no soft-dirty memory tracking)"
            }
        );
        for warning in &self.warnings {
            let _ = write!(out, "\n  warning   {warning}");
        }
        out
    }
}

fn ms(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} s", v as f64 / 1000.0)
    } else {
        format!("{v} ms")
    }
}

fn bytes(v: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = v as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn formats_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
        assert_eq!(ms(812), "812 ms");
        assert_eq!(ms(12_345), "12.3 s");
    }

    #[test]
    fn summary_serialises_every_figure() {
        let s = Summary {
            container: "c1".into(),
            destination: "h:1".into(),
            downtime_ms: 1,
            total_ms: 2,
            dump_ms: 3,
            transfer_and_restore_ms: 4,
            restore_ms: 5,
            bytes_raw: 6,
            bytes_compressed: 11,
            bytes_wire: 7,
            layers_sent: 8,
            layers_reused: 9,
            files: 10,
            mode: "stop-and-copy",
            pre_copy_available: false,
            warnings: vec!["w1".into()],
        };
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(v["downtime_ms"], 1);
        assert_eq!(v["bytes_wire"], 7);
        assert_eq!(v["mode"], "stop-and-copy");
        assert_eq!(v["warnings"][0], "w1");
        assert!(s.human().contains("soft-dirty"));
        assert!(s.human().contains("warning   w1"));
    }
}
