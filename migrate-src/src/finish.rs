//! Phase 8: the end of a migration on the source, either way.
//!
//! Success: the destination runs the container, so CRIU may kill the frozen
//! source copy; then runc's record and our working dir go, and the
//! destination is told to commit. Failure: the destination is told to abort,
//! CRIU resumes the container, and the error says which side failed and
//! confirms (from runc) that the container runs on the source again.

use std::time::Duration;

use migrate_common::mount::unmount_all_under;
use migrate_common::protocol::{Abort, Body, Commit, ControlError, Failed};
use migrate_common::runc::Runc;

use crate::checkpoint::Outcome;
use crate::{MigrateOptions, Session};

/// How long the source waits for the destination's last word.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a migration stopped, before rollback.
#[derive(Debug)]
pub(crate) enum Failure {
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
            | Self::Interrupted { outcome } => outcome,
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

/// Success: returns warnings about cleanup steps that failed (the migration
/// itself succeeded: the container runs on the destination).
pub(crate) async fn complete(session: &mut Session, opts: &MigrateOptions) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(checkpoint) = session.checkpoint.take() {
        match checkpoint.finish().await {
            Ok(Outcome::Finished) => {}
            Ok(Outcome::Resumed) => warnings.push(
                "CRIU resumed the source copy after the destination restored it: stop one of them"
                    .to_owned(),
            ),
            Err(e) => warnings.push(format!("{e:#}")),
        }
    }
    if let Err(e) = remove_runc_record(&opts.runc, &opts.container_id) {
        warnings.push(format!("removing the source's runc record: {e:#}"));
    }
    if let Some(work) = session.work.take() {
        if let Err(e) = work.remove() {
            warnings.push(format!("{e:#}"));
        }
    }
    if let Some(control) = session.control.as_mut() {
        let confirmed = tokio::time::timeout(FAREWELL_TIMEOUT, async {
            control.send(Commit {}).await?;
            control.recv().await
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
    close(session).await;
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

pub(crate) async fn roll_back(
    mut session: Session,
    failure: Failure,
    opts: &MigrateOptions,
) -> MigrationError {
    let told_destination = matches!(failure, Failure::Refused(_) | Failure::Destination(_));
    if !told_destination {
        if let Some(control) = session.control.as_mut() {
            let reason = match &failure {
                Failure::Interrupted => "interrupted on the source".to_owned(),
                Failure::Timeout(t) => format!("source freeze timeout ({t:?}) expired"),
                _ => "the source is rolling back".to_owned(),
            };
            let _ =
                tokio::time::timeout(Duration::from_secs(2), control.send(Abort { reason })).await;
        }
    }

    let mut outcome = Vec::new();
    let froze = session.checkpoint.is_some();
    if let Some(checkpoint) = session.checkpoint.take() {
        if let Err(e) = checkpoint.resume().await {
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
    close(&mut session).await;
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

async fn close(session: &mut Session) {
    if let Some(mut control) = session.control.take() {
        let _ = control.send_half().finish();
    }
    if let Some(conn) = session.conn.take() {
        conn.close(0u32.into(), b"done");
    }
    if let Some(endpoint) = session.endpoint.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
}
