//! What the user sees while a migration runs: phases and bytes (indicatif,
//! on a terminal only), and notes such as each pre-copy round as it ends.
//! The summary at the end is [`crate::report`].

use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use migrate_common::transfer::TransferStats;

#[derive(Debug)]
pub struct Reporter {
    bar: Option<ProgressBar>,
    /// Plain phase lines on stderr when there is no bar and no JSON.
    log_phases: bool,
    /// Said before each line when several migrations share stderr (a
    /// drain): `migrate: <label>: ...`.
    label: Option<String>,
}

impl Reporter {
    /// `interactive`: stderr is a terminal and the user did not ask for JSON.
    pub fn new(interactive: bool, json: bool) -> Self {
        let bar = interactive.then(|| {
            spinner(ProgressBar::with_draw_target(
                None,
                ProgressDrawTarget::stderr(),
            ))
        });
        Self {
            log_phases: bar.is_none() && !json,
            bar,
            label: None,
        }
    }

    /// One of several migrations at once, each line said with `label`: its
    /// bar in `group` (on a terminal), plain lines otherwise.
    pub fn in_group(group: Option<&MultiProgress>, label: &str, json: bool) -> Self {
        let bar = group.map(|group| spinner(group.add(ProgressBar::new_spinner())));
        if let Some(bar) = &bar {
            bar.set_prefix(format!("{label}: "));
        }
        Self {
            log_phases: bar.is_none() && !json,
            bar,
            label: Some(label.to_owned()),
        }
    }

    pub fn phase(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(bar) => bar.set_message(msg),
            None if self.log_phases => eprintln!("migrate: {}{msg}", self.prefix()),
            None => {}
        }
    }

    /// A line that stays: above the bar on a terminal, on stderr otherwise
    /// (with `--json` too: the object goes to stdout).
    pub fn note(&self, msg: impl AsRef<str>) {
        let line = format!("migrate: {}{}", self.prefix(), msg.as_ref());
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn prefix(&self) -> String {
        self.label
            .as_ref()
            .map(|label| format!("{label}: "))
            .unwrap_or_default()
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

fn spinner(bar: ProgressBar) -> ProgressBar {
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix}{msg} {binary_bytes} {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}
