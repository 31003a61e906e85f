//! Pre-copy: CRIU pre-dumps while the container runs, each round's images
//! sent to the destination while the workload goes on dirtying the pages the
//! next round will carry, until the convergence rule ([`crate::convergence`])
//! says to freeze.
//!
//! Round `n` is dumped into `images/n` with `--parent-path ../n-1`, so it
//! holds only the pages written since round `n-1` (CRIU's soft-dirty
//! tracking); the final dump then names the last round as its parent.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use migrate_common::criu::stats::DumpStats;
use migrate_common::criu::{log_tail, ConfigFile, LOG_TAIL_LINES};
use migrate_common::protocol::RoundSent;
use migrate_common::runc::{CheckpointSpec, DumpKind};
use migrate_common::transfer::Outbound;

use crate::checkpoint::{read_output, DumpSetup};
use crate::convergence::{Decision, Policy, RoundFigures, Verdict};
use crate::link::Link;
use crate::report::RoundReport;
use crate::send;

/// What the pre-copy rounds left for the final step.
#[derive(Debug)]
pub struct PreCopy {
    /// The last round, which the final dump builds on (0: none ran).
    pub last_round: u32,
    pub reports: Vec<RoundReport>,
    /// The rule's verdict on the last round.
    pub verdict: Option<Verdict>,
}

/// The parent of a dump that follows round `round`, relative to its own
/// image dir (`images/final` or `images/<n>`), as CRIU expects it.
pub fn parent_of(round: u32) -> Option<PathBuf> {
    (round > 0).then(|| Path::new("..").join(round.to_string()))
}

/// Runs rounds until the rule stops them. `on_round` is told of each round
/// as it ends (progress display); `advance` moves the source's state.
pub async fn run(
    setup: &DumpSetup<'_>,
    link: &mut Link,
    out: &Outbound,
    policy: Policy,
    mut advance: impl FnMut(u32) -> Result<()>,
    mut on_round: impl FnMut(&RoundReport),
) -> Result<PreCopy> {
    let mut figures: Vec<RoundFigures> = Vec::new();
    let mut reports = Vec::new();
    let mut previous_start: Option<Instant> = None;
    let mut round = 0;
    let verdict = loop {
        round += 1;
        advance(round)?;
        let dir = setup.work.round_dir(round);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let started = Instant::now();
        pre_dump(setup, &dir, parent_of(round - 1).as_deref()).await?;
        let dumped = Instant::now();
        let criu = DumpStats::read(&dir)?;

        let (raw_before, wire_before) = (out.stats.raw_bytes(), link.conn.stats().udp_tx.bytes);
        let files = send::send_images(&link.conn, &dir, round, out).await?;
        link.control
            .send(RoundSent { round, files })
            .await
            .context("telling the destination the round was sent")?;
        let sent = Instant::now();
        let wire_bytes = link.conn.stats().udp_tx.bytes - wire_before;

        figures.push(RoundFigures {
            pages_written: criu.pages_written,
            pages_skipped: criu.pages_skipped_parent,
            frozen_ms: criu.frozen_us as f64 / 1000.0,
            memdump_ms: criu.memdump_us as f64 / 1000.0,
            memwrite_ms: criu.memwrite_us as f64 / 1000.0,
            pages_total: criu.pages_scanned,
            window_ms: previous_start.map(|p| millis_f(started - p)),
            dump_ms: millis_f(dumped - started),
            transfer_ms: millis_f(sent - dumped),
            wire_bytes,
        });
        previous_start = Some(started);
        let judged = policy.judge(&figures);
        let report = RoundReport::pre_dump(
            round,
            &criu,
            out.stats.raw_bytes() - raw_before,
            wire_bytes,
            millis_f(dumped - started),
            millis_f(sent - dumped),
            &judged,
        );
        on_round(&report);
        reports.push(report);
        if judged.decision.stops() {
            break judged;
        }
        debug_assert_eq!(judged.decision, Decision::AnotherRound);
    };
    Ok(PreCopy {
        last_round: round,
        reports,
        verdict: Some(verdict),
    })
}

/// One `runc checkpoint --pre-dump` into `dir`; the container keeps
/// running. No action script: nothing waits on a pre-dump.
async fn pre_dump(setup: &DumpSetup<'_>, dir: &Path, parent: Option<&Path>) -> Result<()> {
    let config = setup.work.root.join("criu-pre-dump.conf");
    ConfigFile {
        ghost_limit: Some(setup.ghost_limit),
        ..ConfigFile::default()
    }
    .write(&config)?;
    let cmd = setup.runc.checkpoint_command(&CheckpointSpec {
        id: setup.id,
        kind: DumpKind::PreDump,
        image_dir: dir,
        work_dir: dir,
        parent,
        criu_config: &config,
        options: setup.options,
    });
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .with_context(|| format!("starting {}", setup.runc.binary.display()))?;
    let status = child.wait().await.context("waiting for the pre-dump")?;
    if !status.success() {
        let output = read_output(&mut child).await;
        bail!(
            "source: the pre-dump of {} failed ({status}); the container keeps running on the source\n\
             runc: {}\nCRIU {}",
            setup.id,
            output.trim(),
            log_tail(&dir.join("dump.log"), LOG_TAIL_LINES)
        );
    }
    Ok(())
}

fn millis_f(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_relative_to_the_dump_dir() {
        assert_eq!(parent_of(0), None);
        assert_eq!(parent_of(3).unwrap(), Path::new("../3"));
    }
}
