//! The decision point and what follows it, in the eager modes
//! (stop-and-copy, pre-copy); post-copy's version is [`crate::postcopy`].
//!
//! The destination restores the container and holds it at CRIU's
//! post-restore step, not running, and says `Restored`. Until then every
//! failure, signal or timeout goes back: the source copy resumes and the
//! destination discards its copy ([`crate::finish::recover`]). On
//! `Restored` the source decides ([`decide`]): it records the decision on
//! disk, then lets CRIU end its frozen copy, waits until that copy's init
//! has exited, and only then sends `Release`. From the decision on nothing
//! goes back: a lost link is reconnected and `Release` sent again; if the
//! destination cannot be reached within `--resume-timeout`, the case is in
//! doubt (its copy is held, not running, until `migrate resolve`).

use std::time::{Duration, Instant};

use anyhow::anyhow;
use migrate_common::hook::Verdict;
use migrate_common::process::wait_for_exit;
use migrate_common::protocol::{
    Body, ControlMessage, Release, Released, Restored, SourcePhase, SourceState,
};
use migrate_common::record::SourcePhase as Recorded;

use crate::finish::{self, Failure, MigrationError};
use crate::freeze::Frozen;
use crate::journal::Journal;
use crate::link::{self, Dial};
use crate::progress::Reporter;
use crate::report::Summary;
use crate::signals::Signals;
use crate::{no_link, step, wind_up, MigrateOptions, Session};

/// Longest the source copy may take to end once CRIU was told to end it.
const SOURCE_END: Duration = Duration::from_secs(20);
/// Longest `runc checkpoint` may take to exit after the release.
const CHECKPOINT_EXIT: Duration = Duration::from_secs(30);

/// What went wrong after the decision.
#[derive(Debug)]
pub(crate) enum AfterDecision {
    /// The destination's copy is held and the source's is gone, or both are
    /// held: an operator settles it with `migrate resolve`.
    InDoubt(String),
    /// The destination failed its copy after the source's was ended.
    Lost(String),
}

/// Stop-and-copy and pre-copy, from `CheckpointSent` to the end.
pub(crate) async fn eager(
    mut session: Session,
    mut frozen: Frozen,
    opts: &MigrateOptions,
    dial: &Dial<'_>,
    signals: &mut Signals,
    reporter: &Reporter,
) -> Result<Summary, MigrationError> {
    reporter.phase("restoring on the destination (container frozen)");
    let deadline = tokio::time::Instant::from_std(frozen.frozen_at + opts.freeze_timeout);
    let held = await_held(&mut session, deadline, opts, signals).await;
    let restored = match held
        .and_then(|restored| decide(&mut session.journal, &mut session.state).map(|()| restored))
    {
        Ok(restored) => restored,
        Err(failure) => {
            reporter.phase("rolling back");
            return Err(finish::recover(session, failure, opts, dial).await);
        }
    };

    reporter.phase("releasing the destination's copy");
    let released = match release_eager(&mut session, opts, dial, signals, reporter).await {
        Ok(released) => released,
        Err(AfterDecision::InDoubt(reason)) => {
            return Err(finish::in_doubt(session, reason, false, opts).await)
        }
        Err(AfterDecision::Lost(reason)) => return Err(finish::lost(session, reason, opts).await),
    };
    let released_at = Instant::now();

    step(&mut session, SourcePhase::Finishing);
    reporter.phase("finishing on the source");
    let mut warnings = Vec::new();
    if let Some(mut checkpoint) = session.eager.take() {
        match tokio::time::timeout(CHECKPOINT_EXIT, checkpoint.ended()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warnings.push(format!("after the source copy ended: {e:#}")),
            Err(_) => warnings.push(format!(
                "`runc checkpoint` (pid {:?}) had not exited {CHECKPOINT_EXIT:?} after the release; \
                 the source copy had ended",
                checkpoint.holder_pid()
            )),
        }
    }
    let (warnings, wire) = wind_up(&mut session, &mut frozen, opts, warnings).await;
    Ok(crate::summary(
        opts,
        &frozen,
        released_at,
        restored.restore_ms,
        released.release_ms,
        None,
        wire,
        warnings,
    ))
}

/// Waits for the destination to hold its restored copy; any other ending
/// before the freeze deadline is a failure that goes back.
async fn await_held(
    session: &mut Session,
    deadline: tokio::time::Instant,
    opts: &MigrateOptions,
    signals: &mut Signals,
) -> Result<Restored, Failure> {
    let Session { link, eager, .. } = session;
    let link = link.as_mut().ok_or_else(no_link)?;
    let checkpoint = eager
        .as_mut()
        .ok_or_else(|| Failure::Source(anyhow!("no checkpoint under way")))?;
    let answer = tokio::select! {
        answer = tokio::time::timeout_at(deadline, link.control.recv()) => answer,
        signal = signals.next() => return Err(Failure::Interrupted(signal)),
        end = checkpoint.ended() => {
            let how = match end {
                Ok(outcome) => format!("{outcome:?}"),
                Err(e) => format!("{e:#}"),
            };
            return Err(Failure::Source(anyhow!(
                "`runc checkpoint` ended before the destination held its copy ({how})"
            )));
        }
    };
    match answer
        .map_err(|_| Failure::Timeout(opts.freeze_timeout))?
        .map_err(Failure::Link)?
        .body
    {
        Some(Body::Restored(restored)) => Ok(restored),
        other => Err(Failure::unexpected("Restored", other)),
    }
}

/// The decision: the destination's copy is the container. Recorded on disk
/// before anything acts on it; if the record cannot be written, nothing was
/// decided and the failure goes back.
pub(crate) fn decide(
    journal: &mut Option<Journal>,
    state: &mut SourceState,
) -> Result<(), Failure> {
    let journal = journal
        .as_mut()
        .ok_or_else(|| Failure::Source(anyhow!("no record of this migration")))?;
    journal
        .set_phase(Recorded::Decided)
        .map_err(|e| Failure::Source(anyhow!(e).context("recording the decision")))?;
    state
        .advance(SourcePhase::Releasing)
        .map_err(|e| Failure::Source(e.into()))
}

/// Ends the source copy, then releases the destination's, reconnecting a
/// lost link; returns the destination's `Released`.
async fn release_eager(
    session: &mut Session,
    opts: &MigrateOptions,
    dial: &Dial<'_>,
    signals: &mut Signals,
    reporter: &Reporter,
) -> Result<Released, AfterDecision> {
    let checkpoint = session
        .eager
        .as_ref()
        .ok_or_else(|| AfterDecision::InDoubt("no checkpoint under way".into()))?;
    checkpoint.decide(Verdict::Proceed);
    // The destination's copy runs only once the source's has ended: frozen
    // processes do not run, but CRIU's ending of them is what the decision
    // asked for, and only an ended init proves it.
    if let Some(pid) = session.source_pid {
        match wait_for_exit(pid, SOURCE_END).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(AfterDecision::InDoubt(format!(
                    "the source copy (pid {pid}) had not ended {SOURCE_END:?} after CRIU was told to end it; \
                     the destination's copy was not released"
                )))
            }
            Err(e) => {
                return Err(AfterDecision::InDoubt(format!(
                    "cannot watch the source copy (pid {pid}) end: {e}; the destination's copy was not released"
                )))
            }
        }
    }
    #[cfg(feature = "fault-injection")]
    if let Some(delay) = migrate_common::transfer::fault::release_delay() {
        tokio::time::sleep(delay).await;
    }
    let mut noted_signal = false;
    loop {
        if let Some(link) = session.link.as_mut() {
            let result = async {
                link.control.send(Release {}).await?;
                loop {
                    tokio::select! {
                        msg = link.control.recv() => return msg,
                        signal = signals.next() => {
                            if !noted_signal {
                                noted_signal = true;
                                reporter.note(format!(
                                    "{signal}: the decision is taken and the source copy is gone; \
                                     finishing the release (nothing is resumed here any more)"
                                ));
                            }
                        }
                    }
                }
            }
            .await;
            match result.map(|m| m.body) {
                Ok(Some(Body::Released(released))) => return Ok(released),
                Ok(Some(Body::Failed(failed))) => {
                    return Err(AfterDecision::Lost(format!(
                        "the destination failed to release its copy at {}: {}{}",
                        failed.stage,
                        failed.message,
                        tail_section(&failed.criu_log_tail)
                    )))
                }
                Ok(other) => {
                    return Err(AfterDecision::InDoubt(format!(
                        "the destination answered the release with {}",
                        ControlMessage { body: other }.kind()
                    )))
                }
                Err(e) => reporter.note(format!(
                    "lost the destination before it confirmed the release ({e}); reconnecting for up to {}",
                    humantime::format_duration(opts.resume_timeout)
                )),
            }
        }
        if let Some(old) = session.link.take() {
            session.retired_wire_bytes += crate::postcopy::wire_bytes(&old.conn);
            old.abandon();
        }
        let deadline = Instant::now() + opts.resume_timeout;
        let (new_link, status) = link::resume(dial, &session.migration_id, 0, deadline)
            .await
            .map_err(|e| AfterDecision::InDoubt(format!("{e:#}")))?;
        if let Some(released) = status.released {
            return Ok(released);
        }
        if let Some(failed) = status.failed {
            return Err(AfterDecision::Lost(format!(
                "the destination lost its copy at {}: {}",
                failed.stage, failed.message
            )));
        }
        if status.restored.is_none() {
            return Err(AfterDecision::Lost(
                "the destination no longer holds a restored copy".into(),
            ));
        }
        reporter.note("the destination is back and holds its copy; releasing it");
        session.link = Some(new_link);
    }
}

pub(crate) fn tail_section(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\ndestination CRIU log: {tail}")
    }
}
