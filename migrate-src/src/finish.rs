//! The end of a migration on the source, every way it can end.
//!
//! Success: the destination runs the container and the source copy is gone
//! (CRIU ended it); runc's record, the work dir and the migration's record
//! go, and the destination is told to commit. Failure before the decision
//! ([`recover`]): the container is resumed here first, then the destination
//! is told to discard its copy (over a new connection if the link was lost)
//! and the error says which side failed and confirms, from runc, that the
//! container runs on the source again. Failure after it ([`in_doubt`]):
//! nothing is resumed or killed; the record keeps the decision and the
//! error says what each side holds and that `migrate resolve` settles it.
//! [`lost`] is for the case the protocol exists to prevent: the destination
//! failed its copy after the source's was ended.

use std::time::Duration;

use migrate_common::hook::Verdict;
use migrate_common::mount::unmount_all_under;
use migrate_common::protocol::{Abort, Body, Commit, ControlError, Failed, Recovery, SourcePhase};
use migrate_common::record::SourcePhase as Recorded;
use migrate_common::runc::Runc;

use crate::checkpoint::Outcome;
use crate::lazy::LazyEnd;
use crate::link::{self, Dial, Link};
use crate::{MigrateOptions, Session};

/// How long the source waits for the destination's last word.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a rollback tries to reach a lost destination to discard the
/// copy it may hold.
const ABORT_RECONNECT: Duration = Duration::from_secs(15);

/// Exit code of a migration in doubt: a copy is held, an operator decides.
pub const EXIT_IN_DOUBT: u8 = 3;
/// Exit code of a container lost: no copy runs, which must never happen.
pub const EXIT_LOST: u8 = 4;

/// Why a migration stopped, before recovery.
#[derive(Debug)]
pub enum Failure {
    Refused(Vec<String>),
    Destination(Failed),
    Source(anyhow::Error),
    Link(ControlError),
    Unexpected {
        expected: &'static str,
        got: String,
    },
    Timeout(Duration),
    /// The signal's name.
    Interrupted(&'static str),
}

impl Failure {
    pub(crate) fn unexpected(expected: &'static str, got: Option<Body>) -> Self {
        let got = match got {
            Some(Body::Abort(a)) => format!("Abort ({})", a.reason),
            Some(Body::Failed(f)) => return Self::Destination(f),
            Some(other) => migrate_common::protocol::ControlMessage { body: Some(other) }
                .kind()
                .to_owned(),
            None => "an empty message".to_owned(),
        };
        Self::Unexpected { expected, got }
    }

    /// What this failure requires, given what the state machine says of
    /// the phase it happened in: a destination that says it failed (and so
    /// removed its copy) cannot be running the container.
    fn recovery(&self, in_phase: Recovery) -> Recovery {
        match (self, in_phase) {
            (Failure::Destination(_) | Failure::Refused(_), Recovery::Reconnect) => {
                Recovery::ResumeSource
            }
            _ => in_phase,
        }
    }
}

/// What the user is told when a migration fails. Every variant states where
/// the container is now.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the destination refused the migration:\n  - {}", reasons.join("\n  - "))]
    Refused {
        reasons: Vec<String>,
        outcome: String,
    },
    #[error(
        "the destination failed at {stage}: {message}{}",
        log_section(criu_log_tail)
    )]
    Destination {
        stage: String,
        message: String,
        criu_log_tail: String,
        outcome: String,
    },
    #[error("the connection to the destination failed")]
    Link {
        #[source]
        source: ControlError,
        outcome: String,
    },
    #[error("the destination answered {got} where {expected} was due")]
    Protocol {
        expected: &'static str,
        got: String,
        outcome: String,
    },
    #[error("the source side failed")]
    Source {
        #[source]
        source: anyhow::Error,
        outcome: String,
    },
    #[error("no answer from the destination within the freeze timeout ({timeout:?})")]
    Timeout { timeout: Duration, outcome: String },
    #[error("interrupted by {signal}")]
    Interrupted {
        signal: &'static str,
        outcome: String,
    },
    #[error("LOST: {reason}")]
    Lost { reason: String, outcome: String },
    #[error("in doubt: {reason}")]
    InDoubt {
        reason: String,
        outcome: String,
        /// The `runc checkpoint` process holding the frozen original.
        held_by: Option<u32>,
    },
}

impl MigrationError {
    /// Where the container is now, confirmed from runc after the rollback.
    pub fn outcome(&self) -> &str {
        match self {
            Self::Refused { outcome, .. }
            | Self::Destination { outcome, .. }
            | Self::Link { outcome, .. }
            | Self::Protocol { outcome, .. }
            | Self::Source { outcome, .. }
            | Self::Timeout { outcome, .. }
            | Self::Interrupted { outcome, .. }
            | Self::Lost { outcome, .. }
            | Self::InDoubt { outcome, .. } => outcome,
        }
    }

    /// 1: failed, the container runs on the source as before; 3: in
    /// doubt; 4: lost.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::InDoubt { .. } => EXIT_IN_DOUBT,
            Self::Lost { .. } => EXIT_LOST,
            _ => 1,
        }
    }

    /// The process holding the frozen original, when in doubt.
    pub fn held_by(&self) -> Option<u32> {
        match self {
            Self::InDoubt { held_by, .. } => *held_by,
            _ => None,
        }
    }

    /// Where the container runs now, in a word, for `--json`.
    pub fn runs_on(&self) -> &'static str {
        match self {
            Self::InDoubt { .. } => "held, in doubt: see migrate resolve",
            Self::Lost { .. } => "nowhere",
            _ => "source",
        }
    }
}

fn log_section(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\ndestination CRIU log: {tail}")
    }
}

/// After the source copy is gone (every mode): runc's record and the work
/// dir go, and the destination is told to commit.
pub(crate) async fn clean_up(session: &mut Session, opts: &MigrateOptions) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Err(e) = remove_runc_record(&opts.runc, &opts.container_id) {
        warnings.push(format!("removing the source's runc record: {e:#}"));
    }
    if let Some(work) = session.work.take() {
        if let Err(e) = work.remove() {
            warnings.push(format!("{e:#}"));
        }
    }
    // A namespace runc made goes with its last process, and its veth with
    // it, but not at once; one that outlives the container keeps its ports.
    for end in std::mem::take(&mut session.host_ends) {
        if let Err(e) = migrate_common::netns::remove_host_end(&end) {
            warnings.push(format!("removing the container's host end {end}: {e:#}"));
        }
    }
    if let Some(link) = session.link.as_mut() {
        let confirmed = tokio::time::timeout(FAREWELL_TIMEOUT, async {
            link.control.send(Commit {}).await?;
            link.control.recv().await
        })
        .await;
        match confirmed {
            Ok(Ok(msg)) if matches!(msg.body, Some(Body::Committed(_))) => {}
            Ok(Ok(msg)) => warnings.push(format!(
                "the destination answered the commit with {}",
                msg.kind()
            )),
            Ok(Err(e)) => warnings.push(format!("the destination did not confirm the commit: {e}")),
            Err(_) => {
                warnings.push("the destination did not confirm the commit in time".to_owned())
            }
        }
    }
    warnings
}

/// runc checkpoint normally removes the container's record itself; this
/// covers the case where it did not.
pub(crate) fn remove_runc_record(runc: &Runc, id: &str) -> anyhow::Result<()> {
    if runc.exists(id) {
        unmount_all_under(&runc.state_dir(id))?;
        runc.delete_force(id)?;
    }
    Ok(())
}

/// Undoes what the failure requires and says where the container is now:
/// the source copy is resumed first (a held destination copy does not run
/// meanwhile), then the destination told to discard its copy.
pub(crate) async fn recover(
    mut session: Session,
    failure: Failure,
    opts: &MigrateOptions,
    dial: &Dial<'_>,
) -> MigrationError {
    let failure = match session.link.as_mut() {
        Some(link) => crate::link::destination_cause(link, failure).await,
        None => failure,
    };
    let recovery = failure.recovery(session.state.recovery());
    let told_destination = matches!(failure, Failure::Refused(_) | Failure::Destination(_));
    // Only once `CheckpointSent` went out can the destination hold a
    // restored copy; before, it discards what it has when told or when the
    // link ends.
    let may_hold = !told_destination && session.state.phase == SourcePhase::AwaitingRestore;

    let mut outcome = Vec::new();
    let froze = session.eager.is_some() || session.lazy.is_some();
    if let Some(mut checkpoint) = session.eager.take() {
        checkpoint.decide(Verdict::Undo);
        match checkpoint.ended().await {
            Ok(Outcome::Resumed) => {}
            Ok(Outcome::Finished) => outcome
                .push("WARNING: CRIU ended the source copy although told to resume it".to_owned()),
            Err(e) => outcome.push(format!("resuming the container failed: {e:#}")),
        }
    }
    if let Some(lazy) = session.lazy.as_mut() {
        if let Err(e) = go_back_from_lazy(lazy, session.tunnel.as_ref()).await {
            outcome.push(format!("resuming the container failed: {e:#}"));
        }
    }
    if let Some(work) = session.work.take() {
        if let Err(e) = work.remove() {
            outcome.push(format!("warning: {e:#}"));
        }
    }
    let id = &opts.container_id;
    let runs_here = match opts.runc.state(id) {
        Ok(state) if state.is_running() => {
            outcome.push(if froze {
                format!(
                    "container {id} was resumed and is running on the source (pid {})",
                    state.pid
                )
            } else {
                format!("container {id} was not touched and is running on the source")
            });
            true
        }
        Ok(state) => {
            outcome.push(format!(
                "WARNING: container {id} is {} on the source",
                state.status
            ));
            false
        }
        Err(e) => {
            outcome.push(format!(
                "WARNING: cannot confirm the state of {id} on the source: {e}"
            ));
            false
        }
    };

    let mut discarded = !may_hold;
    if !told_destination && recovery != Recovery::KeepDestination && (runs_here || !may_hold) {
        let reason = match &failure {
            Failure::Interrupted(signal) => format!("{signal} on the source"),
            Failure::Timeout(t) => format!("source freeze timeout ({t:?}) expired"),
            _ => "the source is rolling back".to_owned(),
        };
        discarded |= tell_abort(&mut session, dial, &reason, may_hold).await;
    }
    if let Some(mut journal) = session.journal.take() {
        let settled = if discarded {
            journal.remove().map_err(|e| format!("{e}"))
        } else {
            journal
                .set_phase(Recorded::Aborted)
                .map_err(|e| format!("{e}"))
        };
        if let Err(e) = settled {
            outcome.push(format!("warning: updating the migration's record: {e}"));
        }
    }
    if !discarded {
        outcome.push(format!(
            "the destination {} may still hold a copy of {id}, restored but not running: \
             `migrate resolve {id}` discards it (it never runs without this host's word)",
            opts.destination
        ));
    }
    if let Some(link) = session.link.take() {
        link.close().await;
    }
    let outcome = outcome.join("\n");

    into_error(failure, outcome)
}

/// A failure before anything was touched.
pub(crate) fn untouched(failure: Failure, opts: &MigrateOptions) -> MigrationError {
    let outcome = format!(
        "container {} was not touched and runs on the source",
        opts.container_id
    );
    into_error(failure, outcome)
}

fn into_error(failure: Failure, outcome: String) -> MigrationError {
    match failure {
        Failure::Refused(reasons) => MigrationError::Refused { reasons, outcome },
        Failure::Destination(f) => MigrationError::Destination {
            stage: f.stage,
            message: f.message,
            criu_log_tail: f.criu_log_tail,
            outcome,
        },
        Failure::Source(source) => MigrationError::Source { source, outcome },
        Failure::Link(source) => MigrationError::Link { source, outcome },
        Failure::Unexpected { expected, got } => MigrationError::Protocol {
            expected,
            got,
            outcome,
        },
        Failure::Timeout(timeout) => MigrationError::Timeout { timeout, outcome },
        Failure::Interrupted(signal) => MigrationError::Interrupted { signal, outcome },
    }
}

/// Tells the destination to discard its copy; when it may hold a restored
/// one, waits for it to confirm, reconnecting if the link is gone. Returns
/// whether it confirmed.
async fn tell_abort(session: &mut Session, dial: &Dial<'_>, reason: &str, confirm: bool) -> bool {
    if let Some(link) = session.link.as_mut() {
        if abort_on(link, reason, confirm).await {
            return true;
        }
    }
    if !confirm {
        return false;
    }
    if let Some(old) = session.link.take() {
        old.abandon();
    }
    let deadline = std::time::Instant::now() + ABORT_RECONNECT;
    match link::resume(dial, &session.migration_id, 0, deadline).await {
        Ok((mut link, status)) => {
            let confirmed = status.restored.is_none() && status.released.is_none()
                || abort_on(&mut link, reason, true).await;
            session.link = Some(link);
            confirmed
        }
        // It answered and holds nothing of this migration.
        Err(e) if e.downcast_ref::<link::Refused>().is_some() => true,
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "reaching the destination to discard its copy");
            false
        }
    }
}

async fn abort_on(link: &mut Link, reason: &str, confirm: bool) -> bool {
    let sent = tokio::time::timeout(
        Duration::from_secs(2),
        link.control.send(Abort {
            reason: reason.to_owned(),
        }),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) || !confirm {
        return false;
    }
    loop {
        match tokio::time::timeout(FAREWELL_TIMEOUT, link.control.recv()).await {
            Ok(Ok(msg)) => match msg.body {
                Some(Body::Discarded(_)) => return true,
                // Messages the destination sent before it read the abort.
                Some(Body::Restored(_) | Body::PagesComplete(_)) => continue,
                _ => return false,
            },
            _ => return false,
        }
    }
}

/// A lazy dump that must not complete: make CRIU fail the page transfer
/// (it then lets go of the original without killing it), wait for it, and
/// resume the original. A CRIU that already failed by itself cannot take
/// the request, which changes nothing.
async fn go_back_from_lazy(
    lazy: &mut crate::lazy::LazyDump,
    tunnel: Option<&migrate_common::tunnel::Tunnel>,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let abort = match (tunnel, lazy.socket.as_mut()) {
        (Some(tunnel), _) => tunnel.abort().await.map_err(anyhow::Error::from),
        (None, Some(socket)) => socket
            .write_all(&migrate_common::criu::page_server::abort_request())
            .await
            .map_err(anyhow::Error::from),
        (None, None) => Err(anyhow::anyhow!("the page-server socket is gone")),
    };
    if let Err(e) = abort {
        tracing::debug!(error = %format!("{e:#}"), "CRIU did not take the abort request");
    }
    match lazy.ended().await? {
        LazyEnd::OriginalKept => lazy.go_back(),
        LazyEnd::OriginalGone => anyhow::bail!("CRIU ended the original instead of keeping it"),
    }
}

/// A migration after its decision that can neither finish nor go back on
/// its own. The record keeps the decision for `migrate resolve`.
pub(crate) async fn in_doubt(
    mut session: Session,
    reason: String,
    released: bool,
    opts: &MigrateOptions,
) -> MigrationError {
    let id = &opts.container_id;
    let held_by = session
        .lazy
        .as_ref()
        .and_then(|l| l.holder_pid())
        .or_else(|| session.eager.as_ref().and_then(|c| c.holder_pid()));
    let record = session
        .journal
        .as_ref()
        .map(|j| j.path().display().to_string())
        .unwrap_or_default();
    let outcome = if session.state.mode.is_lazy() {
        let holder = held_by
            .map(|pid| format!(" (held by `runc checkpoint`, pid {pid})"))
            .unwrap_or_default();
        let destination = if released {
            "the destination runs its copy, which waits on the pages it does not have yet"
        } else {
            "the destination's copy is held, or runs (waiting on the pages it lacks) if the release \
             reached it before the link was lost"
        };
        format!(
            "nothing was resumed or killed: container {id} is frozen on the source with all of its memory{holder}; \
             {destination}. Nothing runs twice; neither side gives its copy up on its own.\n\
             The page transfer cannot go on without this `migrate`, which relayed it. The original still \
             has every page: `migrate resolve {id} --go-back` discards the copy on {} (losing what it did \
             since the freeze), then resumes the original.",
            opts.destination
        )
    } else {
        format!(
            "the decision was taken (recorded in {record}): the source copy of {id} is gone; on the \
             destination {} its copy is held until told, or runs if the release reached it before the \
             link was lost. Nothing runs twice.\n\
             `migrate resolve {id}` releases it (or confirms it runs) once the destination can be reached.",
            opts.destination
        )
    };
    if let Some(link) = session.link.take() {
        link.abandon();
    }
    // The work dir holds the images CRIU still uses; it stays, as does the
    // record with the decision.
    session.work = None;
    session.journal = None;
    MigrationError::InDoubt {
        reason,
        outcome,
        held_by,
    }
}

/// The destination failed its copy after the source's was ended: no copy
/// runs. Said as it is; the images stay for a manual restore.
pub(crate) async fn lost(
    mut session: Session,
    reason: String,
    opts: &MigrateOptions,
) -> MigrationError {
    let id = &opts.container_id;
    let images = session
        .work
        .take()
        .map(|w| format!("; its final images are kept in {}", w.final_dir().display()))
        .unwrap_or_default();
    if let Some(link) = session.link.take() {
        link.close().await;
    }
    // The record keeps the decision: `migrate resolve` reports the case again.
    session.journal = None;
    MigrationError::Lost {
        reason,
        outcome: format!(
            "container {id} runs nowhere: the source copy was ended after the decision and the \
             destination lost its copy{images}"
        ),
    }
}
