//! What the user sees while a drain runs: on a terminal, a bar of
//! containers done out of all, with each migration's own bar under it;
//! otherwise a plain line per event on stderr.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::report::Entry;
use crate::progress::Reporter;

#[derive(Debug)]
pub struct DrainProgress {
    group: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    json: bool,
}

impl DrainProgress {
    /// `interactive`: stderr is a terminal and the user did not ask for JSON.
    pub fn new(interactive: bool, json: bool) -> Self {
        let group =
            interactive.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let overall = group.as_ref().map(|group| {
            let bar = group.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template("drain [{bar:30}] {pos}/{len} containers {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self {
            group,
            overall,
            json,
        }
    }

    /// A line that stays (above the bars on a terminal).
    pub fn note(&self, msg: impl AsRef<str>) {
        let line = format!("migrate: drain: {}", msg.as_ref());
        match &self.group {
            Some(group) => {
                let _ = group.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    pub fn set_total(&self, total: usize) {
        if let Some(bar) = &self.overall {
            bar.set_length(u64::try_from(total).unwrap_or(u64::MAX));
        }
    }

    /// The reporter of one container's migration.
    pub fn migration(&self, container: &str) -> Reporter {
        Reporter::in_group(self.group.as_ref(), container, self.json)
    }

    /// One container settled (moved, failed, skipped).
    pub fn done(&self, entry: &Entry) {
        let mut line = format!("{}: {}", entry.container, entry.outcome.word());
        if let Some(d) = &entry.destination {
            line.push_str(&format!(" ({d})"));
        }
        if let Some(r) = &entry.reason {
            line.push_str(&format!(": {}", r.lines().next().unwrap_or_default()));
        }
        self.note(line);
        if let Some(bar) = &self.overall {
            bar.inc(1);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.overall {
            bar.finish_and_clear();
        }
    }
}
