//! The end of a migration on the source, every way it can end.
//!
//! Success: the destination runs the container and the source copy is gone
//! (CRIU ended it); runc's record and our working dir go, and the
//! destination is told to commit. Failure before the decision point: the
//! destination is told to abort, the container is resumed here, and the
//! error says which side failed and confirms (from runc) that the container
//! runs on the source again. Failure after it in post-copy: nothing is
//! resumed or killed; the error says the case is in doubt and what each side
//! holds.

use std::time::Duration;

use migrate_common::mount::unmount_all_under;
use migrate_common::protocol::{Abort, Body, Commit, ControlError, Failed, Recovery};
use migrate_common::runc::Runc;

use crate::checkpoint::Outcome;
use crate::lazy::LazyEnd;
use crate::{MigrateOptions, Session};

/// How long the source waits for the destination's last word.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit code of a migration in doubt: both copies held, an operator decides.
pub const EXIT_IN_DOUBT: u8 = 3;

/// Why a migration stopped, before recovery.
#[derive(Debug)]
pub enum Failure {
    Refused(Vec<String>),
    Destination(Failed),
    Source(anyhow::Error),
    Link(ControlError),
    Unexpected { expected: &'static str, got: String },
    Timeout(Duration),
    Interrupted,
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
    #[error("interrupted")]
    Interrupted { outcome: String },
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
            | Self::Interrupted { outcome }
            | Self::InDoubt { outcome, .. } => outcome,
        }
    }

    /// 1: failed, the container runs on the source as before; 3: in doubt.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::InDoubt { .. } => EXIT_IN_DOUBT,
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
            Self::InDoubt { .. } => "held on both hosts, in doubt",
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

/// The eager modes' success: CRIU may kill the frozen source copy. Returns
/// warnings (the migration itself succeeded: the container runs on the
/// destination).
pub(crate) async fn end_source_copy(session: &mut Session) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(checkpoint) = session.eager.take() {
        match checkpoint.finish().await {
            Ok(Outcome::Finished) => {}
            Ok(Outcome::Resumed) => warnings.push(
                "CRIU resumed the source copy after the destination restored it: stop one of them"
                    .to_owned(),
            ),
            Err(e) => warnings.push(format!("{e:#}")),
        }
    }
    warnings
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
fn remove_runc_record(runc: &Runc, id: &str) -> anyhow::Result<()> {
    if runc.exists(id) {
        unmount_all_under(&runc.state_dir(id))?;
        runc.delete_force(id)?;
    }
    Ok(())
}

/// Undoes what the failure requires and says where the container is now.
pub(crate) async fn recover(
    mut session: Session,
    failure: Failure,
    opts: &MigrateOptions,
) -> MigrationError {
    let recovery = failure.recovery(session.state.recovery());
    let told_destination = matches!(failure, Failure::Refused(_) | Failure::Destination(_));
    if !told_destination && recovery != Recovery::KeepDestination {
        if let Some(link) = session.link.as_mut() {
            let reason = match &failure {
                Failure::Interrupted => "interrupted on the source".to_owned(),
                Failure::Timeout(t) => format!("source freeze timeout ({t:?}) expired"),
                _ => "the source is rolling back".to_owned(),
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(2), link.control.send(Abort { reason }))
                    .await;
        }
    }

    let mut outcome = Vec::new();
    let froze = session.eager.is_some() || session.lazy.is_some();
    if let Some(checkpoint) = session.eager.take() {
        if let Err(e) = checkpoint.resume().await {
            outcome.push(format!("resuming the container failed: {e:#}"));
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
    outcome.push(match opts.runc.state(id) {
        Ok(state) if state.is_running() && froze => {
            format!(
                "container {id} was resumed and is running on the source (pid {})",
                state.pid
            )
        }
        Ok(state) if state.is_running() => {
            format!("container {id} was not touched and is running on the source")
        }
        Ok(state) => format!("WARNING: container {id} is {} on the source", state.status),
        Err(e) => format!("WARNING: cannot confirm the state of {id} on the source: {e}"),
    });
    if let Some(link) = session.link.take() {
        link.close().await;
    }
    let outcome = outcome.join("\n");

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
        Failure::Interrupted => MigrationError::Interrupted { outcome },
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

/// A post-copy migration that can neither go on nor go back on its own.
pub(crate) async fn in_doubt(
    mut session: Session,
    reason: String,
    restored: bool,
    opts: &MigrateOptions,
) -> MigrationError {
    let id = &opts.container_id;
    let held_by = session.lazy.as_ref().and_then(|l| l.holder_pid());
    let holder = held_by
        .map(|pid| format!(" (held by `runc checkpoint`, pid {pid})"))
        .unwrap_or_default();
    let destination = if restored {
        "the destination runs its copy, which waits on the pages it does not have yet"
    } else {
        "the destination may have restored its copy, which would wait on its pages"
    };
    let outcome = format!(
        "nothing was resumed or killed: container {id} is frozen on the source with all of its memory{holder}; \
         {destination}. Nothing runs twice. The destination keeps its copy held until told.\n\
         To go on, the page transfer must resume over a new connection to {}; to go back, the destination's \
         copy must be removed (losing what it did since the freeze) before the original is resumed. \
         Decide which; do not resume the original while the destination's copy exists.",
        opts.destination
    );
    if let Some(link) = session.link.take() {
        link.abandon();
    }
    // The work dir holds the images CRIU still uses; it stays.
    session.work = None;
    MigrationError::InDoubt {
        reason,
        outcome,
        held_by,
    }
}
