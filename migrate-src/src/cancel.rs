//! `migrate cancel <id>`: ends one migration at a safe point. It writes the
//! migration's cancel request and sends SIGUSR2 to the process holding its
//! record's lock (a `migrate`, or a `migrate drain` running several
//! migrations, of which only this one takes it: see [`crate::signals`]).
//! That migration treats it as it treats SIGINT where it is: before the
//! decision it rolls back and the container runs here as before; after it,
//! it finishes. Nothing else is touched from here, so a cancel can never
//! leave two copies running or none.
//!
//! The holder is read from `/proc/locks`, not from the record alone: a
//! record names the process that started the migration (`agent_pid`), and
//! only while that process holds the lock is there a migration to cancel.
//! A lock held by another process (a `migrate resolve`) is left alone, and
//! so is a record written before `agent_pid` existed: its `migrate` may not
//! take SIGUSR2, whose default action kills.

use std::path::Path;
use std::time::{Duration, Instant};

use migrate_common::record::{self, SourcePhase, SourceRecord};
use migrate_common::runc::Runc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::journal::{self, JournalError};

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no migration of {id} is recorded in {state_dir}")]
    NoRecord { id: String, state_dir: String },
    #[error(
        "no live migration of {id}: its record says {phase:?} and no `migrate` holds it \
         (see `migrate status`; `migrate resolve {id}` settles it)"
    )]
    NotLive { id: String, phase: SourcePhase },
    #[error(
        "the record of {id} is held by pid {holder}, not by the `migrate` that recorded the migration \
         (pid {agent}): a `migrate resolve`, or a new migration not yet recorded; not signalled"
    )]
    NotTheAgent { id: String, holder: u32, agent: u32 },
    #[error(
        "the record of {id} was written by a `migrate` without cancel requests (pid {holder}); \
         `kill -INT {holder}` interrupts it (and every migration a drain in it runs)"
    )]
    Unrecorded { id: String, holder: u32 },
    #[error("writing the cancel request {path}")]
    Request {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signalling migrate (pid {pid})")]
    Signal {
        pid: u32,
        #[source]
        source: nix::Error,
    },
    #[error(
        "the migration still runs after {waited:?} (pid {pid}); it ends at its next safe point by itself"
    )]
    StillRunning { pid: u32, waited: Duration },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Record(#[from] record::RecordError),
}

/// What a cancel did.
#[derive(Debug, Clone, Serialize)]
pub struct Cancelled {
    pub container: String,
    pub migration_id: String,
    pub pid: u32,
    /// The record's phase when the signal was sent (it may have decided
    /// right after: `runs_on` says how it ended).
    pub phase: SourcePhase,
    /// The record afterwards: none once the migration settled.
    pub phase_after: Option<SourcePhase>,
    /// "source" (rolled back), "destination" (it had decided, and
    /// finished), or "in doubt" (decided, not finished: `migrate status`).
    pub runs_on: &'static str,
}

impl Cancelled {
    pub fn line(&self) -> String {
        let what = match self.runs_on {
            "source" => "it rolled back: the container runs here",
            "destination" => "it had decided, so it finished: the container runs on the destination",
            _ => "it had decided and could not finish: the migration is in doubt, see `migrate status`",
        };
        let mut line = format!(
            "asked migrate (pid {}) to cancel {} [migration {}]; {what}",
            self.pid, self.container, self.migration_id
        );
        if let Some(phase) = self.phase_after.filter(|_| self.runs_on == "source") {
            line.push_str(&format!(
                "\nits record is left {phase:?}: the destination may hold a copy that never runs; \
                 `migrate resolve {}` discards it",
                self.container
            ));
        }
        line
    }
}

/// Where the container runs once its `migrate` ended: from the record
/// left, and whether runc runs it here.
fn runs_on(phase_after: Option<SourcePhase>, running_here: bool) -> &'static str {
    match (phase_after, running_here) {
        (Some(SourcePhase::Decided), _) => "in doubt",
        (_, true) => "source",
        (_, false) => "destination",
    }
}

/// Cancels the live migration of container `id` (or of migration `id`),
/// then waits up to `wait` for it to end.
pub fn cancel(
    state_dir: &Path,
    runc: &Runc,
    id: &str,
    wait: Duration,
) -> Result<Cancelled, CancelError> {
    let (container, rec) = find(state_dir, id)?;
    let Some(holder) = journal::lock_holder(state_dir, &container) else {
        return Err(CancelError::NotLive {
            id: container,
            phase: rec.phase,
        });
    };
    match rec.agent_pid {
        None => {
            return Err(CancelError::Unrecorded {
                id: container,
                holder,
            })
        }
        Some(agent) if agent != holder => {
            return Err(CancelError::NotTheAgent {
                id: container,
                holder,
                agent,
            })
        }
        Some(_) => {}
    }
    let request = journal::cancel_request_path(state_dir, &container);
    std::fs::write(&request, std::process::id().to_string()).map_err(|source| {
        CancelError::Request {
            path: request.clone(),
            source,
        }
    })?;
    let pid = i32::try_from(holder).map_err(|_| CancelError::Signal {
        pid: holder,
        source: nix::Error::EINVAL,
    })?;
    kill(Pid::from_raw(pid), Signal::SIGUSR2).map_err(|source| CancelError::Signal {
        pid: holder,
        source,
    })?;
    let deadline = Instant::now() + wait;
    while journal::lock_holder(state_dir, &container) == Some(holder) {
        if Instant::now() >= deadline {
            return Err(CancelError::StillRunning {
                pid: holder,
                waited: wait,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The next lock holder removes it too; a cancel that waited removes
    // its own.
    let _ = std::fs::remove_file(&request);
    let phase_after = record::load::<SourceRecord>(&journal::record_path(state_dir, &container))?
        .map(|r| r.phase);
    let running_here = runc.state(&container).is_ok_and(|s| s.is_running());
    Ok(Cancelled {
        runs_on: runs_on(phase_after, running_here),
        container,
        migration_id: rec.migration_id,
        pid: holder,
        phase: rec.phase,
        phase_after,
    })
}

/// The record of container `id`, or the one whose migration id is `id`.
fn find(state_dir: &Path, id: &str) -> Result<(String, SourceRecord), CancelError> {
    if migrate_common::valid_container_id(id) {
        if let Some(rec) = record::load::<SourceRecord>(&journal::record_path(state_dir, id))? {
            return Ok((id.to_owned(), rec));
        }
    }
    journal::records(state_dir)?
        .into_iter()
        .find_map(|(container, rec)| {
            rec.ok()
                .filter(|r| r.migration_id == id)
                .map(|r| (container, r))
        })
        .ok_or_else(|| CancelError::NoRecord {
            id: id.to_owned(),
            state_dir: state_dir.display().to_string(),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::journal::Journal;

    fn runc() -> Runc {
        Runc::new("runc", "/nonexistent", None)
    }

    #[test]
    fn how_it_ended_follows_the_record_and_runc() {
        assert_eq!(runs_on(None, true), "source");
        assert_eq!(runs_on(Some(SourcePhase::Aborted), true), "source");
        assert_eq!(runs_on(None, false), "destination");
        assert_eq!(runs_on(Some(SourcePhase::Decided), false), "in doubt");
    }

    #[test]
    fn refuses_without_a_record_or_a_live_holder() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            cancel(dir.path(), &runc(), "web", Duration::ZERO),
            Err(CancelError::NoRecord { .. })
        ));
        let (mut journal, _) = Journal::lock(dir.path(), "web").unwrap();
        journal.start("m1", "dst:7070", "auto").unwrap();
        drop(journal);
        assert!(matches!(
            cancel(dir.path(), &runc(), "m1", Duration::ZERO),
            Err(CancelError::NotLive { .. })
        ));
    }

    #[test]
    fn a_lock_held_by_another_process_than_the_agent_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::lock(dir.path(), "web").unwrap();
        journal.start("m1", "dst:7070", "auto").unwrap();
        // As a `migrate resolve` finds it: the migrate that wrote it is gone.
        let mut rec = journal.record().clone();
        rec.agent_pid = Some(1);
        record::store(journal.path(), &rec).unwrap();
        assert!(matches!(
            cancel(dir.path(), &runc(), "web", Duration::ZERO),
            Err(CancelError::NotTheAgent { agent: 1, .. })
        ));
        // Written by a `migrate` from before agent_pid: not signalled.
        rec.agent_pid = None;
        record::store(journal.path(), &rec).unwrap();
        assert!(matches!(
            cancel(dir.path(), &runc(), "web", Duration::ZERO),
            Err(CancelError::Unrecorded { .. })
        ));
        assert!(!journal::cancel_request_path(dir.path(), "web").exists());
    }
}
