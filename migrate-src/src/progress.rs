//! What the user sees while a migration runs: phases and bytes (indicatif,
//! on a terminal only), and notes such as each pre-copy round as it ends.
//! The summary at the end is [`crate::report`].

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use migrate_common::transfer::TransferStats;

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

    /// A line that stays: above the bar on a terminal, on stderr otherwise
    /// (with `--json` too: the object goes to stdout).
    pub fn note(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(format!("migrate: {}", msg.as_ref())),
            None => eprintln!("migrate: {}", msg.as_ref()),
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
