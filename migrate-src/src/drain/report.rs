//! What a drain reports: a line per container (moved, skipped, failed, in
//! doubt), totals, the reboot, and the exit status that sums them up, as
//! text or as one JSON object.

use std::fmt::Write as _;

use serde::Serialize;

use crate::finish::{EXIT_IN_DOUBT, EXIT_LOST};

/// Some moved, the others run on the source (skipped or failed).
pub const EXIT_PARTIAL: u8 = 5;
/// Every container moved, but the reboot command failed.
pub const EXIT_REBOOT_FAILED: u8 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Moved,
    /// A dry run's: it would move.
    WouldMove,
    /// Not tried: no destination would take it, or the drain stopped first.
    Skipped,
    /// Tried; it runs on the source as before.
    Failed,
    InDoubt,
    /// No copy runs (must never happen).
    Lost,
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Self::Moved => "moved",
            Self::WouldMove => "would move",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
            Self::InDoubt => "in doubt",
            Self::Lost => "LOST",
        }
    }
}

/// One container's line.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub container: String,
    pub outcome: Outcome,
    /// Where it went, was sent, or would go.
    pub destination: Option<String>,
    /// The memory mode used (or that would be).
    pub mode: Option<String>,
    pub downtime_ms: Option<u64>,
    /// Why it did not move.
    pub reason: Option<String>,
    /// Where it runs now: `source`, the destination, or what the failure
    /// says (in doubt: held, see `migrate resolve`).
    pub runs_on: String,
}

impl Entry {
    pub fn staying(container: &str, outcome: Outcome, reason: String) -> Self {
        Self {
            container: container.to_owned(),
            outcome,
            destination: None,
            mode: None,
            downtime_ms: None,
            reason: Some(reason),
            runs_on: "source".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub containers: usize,
    pub moved: usize,
    pub would_move: usize,
    pub skipped: usize,
    pub failed: usize,
    pub in_doubt: usize,
    pub lost: usize,
}

impl Totals {
    pub fn of(entries: &[Entry]) -> Self {
        let mut t = Self {
            containers: entries.len(),
            ..Self::default()
        };
        for e in entries {
            *match e.outcome {
                Outcome::Moved => &mut t.moved,
                Outcome::WouldMove => &mut t.would_move,
                Outcome::Skipped => &mut t.skipped,
                Outcome::Failed => &mut t.failed,
                Outcome::InDoubt => &mut t.in_doubt,
                Outcome::Lost => &mut t.lost,
            } += 1;
        }
        t
    }
}

/// The drain's exit status from its containers' outcomes (a dry run's
/// "would move" counts as moved): 4 if one is lost, 3 if one is in doubt,
/// 0 if all moved (or there was none), 1 if none did, 5 otherwise.
pub fn exit_code(entries: &[Entry]) -> u8 {
    let t = Totals::of(entries);
    let moved = t.moved + t.would_move;
    if t.lost > 0 {
        EXIT_LOST
    } else if t.in_doubt > 0 {
        EXIT_IN_DOUBT
    } else if moved == t.containers {
        0
    } else if moved == 0 {
        1
    } else {
        EXIT_PARTIAL
    }
}

/// What became of `--reboot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Reboot {
    /// The reboot command ran and succeeded.
    Rebooting {
        command: String,
    },
    /// Not every container moved: no reboot.
    NotRebooting {
        reason: String,
    },
    Failed {
        command: String,
        error: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    pub dry_run: bool,
    pub destinations: Vec<String>,
    pub containers: Vec<Entry>,
    pub totals: Totals,
    /// Why no more containers were started, when the drain was stopped.
    pub stopped: Option<String>,
    pub reboot: Option<Reboot>,
    pub exit_code: u8,
}

impl DrainReport {
    pub fn new(
        dry_run: bool,
        destinations: Vec<String>,
        containers: Vec<Entry>,
        stopped: Option<String>,
    ) -> Self {
        Self {
            dry_run,
            destinations,
            totals: Totals::of(&containers),
            exit_code: exit_code(&containers),
            containers,
            stopped,
            reboot: None,
        }
    }

    /// Records what `--reboot` did: a failed reboot command turns a full
    /// success into [`EXIT_REBOOT_FAILED`].
    pub fn set_reboot(&mut self, reboot: Reboot) {
        if matches!(reboot, Reboot::Failed { .. }) && self.exit_code == 0 {
            self.exit_code = EXIT_REBOOT_FAILED;
        }
        self.reboot = Some(reboot);
    }

    pub fn human(&self) -> String {
        let mut text = String::new();
        for e in &self.containers {
            let _ = write!(text, "{:<10} {}", e.outcome.word(), e.container);
            if let Some(d) = &e.destination {
                let _ = write!(text, " → {d}");
            }
            if let Some(m) = &e.mode {
                let _ = write!(text, " ({m}");
                if let Some(ms) = e.downtime_ms {
                    let _ = write!(
                        text,
                        ", downtime {}",
                        humantime::format_duration(std::time::Duration::from_millis(ms))
                    );
                }
                text.push(')');
            }
            if let Some(r) = &e.reason {
                let _ = write!(text, ": {}", r.replace('\n', "\n    "));
            }
            if e.outcome != Outcome::Moved {
                let _ = write!(text, " [runs on: {}]", e.runs_on);
            }
            text.push('\n');
        }
        let t = &self.totals;
        let counts: Vec<String> = [
            (t.moved, "moved"),
            (t.would_move, "would move"),
            (t.skipped, "skipped"),
            (t.failed, "failed"),
            (t.in_doubt, "in doubt (see migrate resolve)"),
            (t.lost, "LOST"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, word)| format!("{n} {word}"))
        .collect();
        let _ = write!(text, "{} container(s)", t.containers);
        if !counts.is_empty() {
            let _ = write!(text, ": {}", counts.join(", "));
        }
        if let Some(why) = &self.stopped {
            let _ = write!(text, "\nstopped early: {why}");
        }
        match &self.reboot {
            Some(Reboot::Rebooting { command }) => {
                let _ = write!(text, "\nrebooting (`{command}`)");
            }
            Some(Reboot::NotRebooting { reason }) => {
                let _ = write!(text, "\nnot rebooting: {reason}");
            }
            Some(Reboot::Failed { command, error }) => {
                let _ = write!(text, "\nthe reboot failed (`{command}`): {error}");
            }
            None => {}
        }
        text
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entries(outcomes: &[Outcome]) -> Vec<Entry> {
        outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| Entry::staying(&format!("c{i}"), *o, String::new()))
            .collect()
    }

    #[test]
    fn the_exit_code_rule() {
        use Outcome::*;
        for (outcomes, code) in [
            (&[][..], 0),
            (&[Moved, Moved][..], 0),
            (&[WouldMove, WouldMove][..], 0),
            (&[Failed, Skipped][..], 1),
            (&[Skipped][..], 1),
            (&[Moved, Skipped][..], 5),
            (&[Moved, Failed][..], 5),
            (&[WouldMove, Skipped][..], 5),
            (&[Moved, InDoubt, Failed][..], 3),
            (&[InDoubt, Lost][..], 4),
        ] {
            assert_eq!(exit_code(&entries(outcomes)), code, "{outcomes:?}");
        }
    }

    #[test]
    fn a_failed_reboot_is_6_only_when_all_moved() {
        let failed = || Reboot::Failed {
            command: "systemctl reboot".into(),
            error: "no".into(),
        };
        let mut all = DrainReport::new(false, vec![], entries(&[Outcome::Moved]), None);
        all.set_reboot(failed());
        assert_eq!(all.exit_code, EXIT_REBOOT_FAILED);
        let mut some = DrainReport::new(
            false,
            vec![],
            entries(&[Outcome::Moved, Outcome::Failed]),
            None,
        );
        some.set_reboot(failed());
        assert_eq!(some.exit_code, EXIT_PARTIAL);
    }

    #[test]
    fn the_text_says_each_container_and_the_totals() {
        let moved = Entry {
            container: "web1".into(),
            outcome: Outcome::Moved,
            destination: Some("d:1".into()),
            mode: Some("stop-and-copy".into()),
            downtime_ms: Some(1500),
            reason: None,
            runs_on: "d:1".into(),
        };
        let skipped = Entry::staying("db1", Outcome::Skipped, "d:1: bind mount source".into());
        let mut report = DrainReport::new(false, vec!["d:1".into()], vec![moved, skipped], None);
        report.set_reboot(Reboot::NotRebooting {
            reason: "1 of 2 container(s) did not move".into(),
        });
        let text = report.human();
        assert!(
            text.contains("moved      web1 → d:1 (stop-and-copy, downtime 1s 500ms)"),
            "{text}"
        );
        assert!(
            text.contains("skipped    db1: d:1: bind mount source [runs on: source]"),
            "{text}"
        );
        assert!(
            text.contains("2 container(s): 1 moved, 1 skipped\n"),
            "{text}"
        );
        assert!(text.contains("not rebooting: 1 of 2"), "{text}");
    }

    #[test]
    fn json_has_the_fields_scripts_read() {
        let mut report = DrainReport::new(
            false,
            vec!["d:1".into()],
            entries(&[Outcome::Skipped, Outcome::InDoubt]),
            None,
        );
        report.set_reboot(Reboot::NotRebooting {
            reason: "1 did not move".into(),
        });
        let value: serde_json::Value =
            serde_json::from_str(&migrate_common::json::versioned(&report).unwrap()).unwrap();
        assert_eq!(value["version"], 1);
        assert_eq!(value["containers"][1]["outcome"], "in-doubt");
        assert_eq!(value["containers"][0]["runs_on"], "source");
        assert_eq!(value["totals"]["skipped"], 1);
        assert_eq!(value["reboot"]["status"], "not-rebooting");
        assert_eq!(value["exit_code"], 3);
    }
}
