//! What the user sees while a drain runs: on a terminal, a bar of
//! containers done out of all, with each migration's own bar under it;
//! otherwise a plain line per event on stderr.

use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::report::Entry;
use crate::progress::Reporter;

#[derive(Debug)]
pub struct DrainProgress {
    group: Option<MultiProgress>,
    /// Shown once the drain knows how many containers it moves.
    overall: OnceLock<ProgressBar>,
    json: bool,
}

impl DrainProgress {
    /// `interactive`: stderr is a terminal and the user did not ask for JSON.
    pub fn new(interactive: bool, json: bool) -> Self {
        Self {
            group: interactive
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            overall: OnceLock::new(),
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
        let Some(group) = &self.group else {
            return;
        };
        let total = u64::try_from(total).unwrap_or(u64::MAX);
        let bar = self.overall.get_or_init(|| {
            let bar = group.insert(0, ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template("drain [{bar:30}] {pos}/{len} containers")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        bar.set_length(total);
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
        if let Some(bar) = self.overall.get() {
            bar.inc(1);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = self.overall.get() {
            bar.finish_and_clear();
        }
    }
}
