//! The source's durable record of one migration, under its state dir on
//! disk: `<state>/migrations/<container-id>.json`, beside a lock file held
//! for as long as a `migrate` process works on that container.
//!
//! The record carries the decision. It is written `Started` before
//! anything is frozen, `Decided` (synced) before the source acts on its
//! decision, and removed once both sides have settled. CRIU's post-dump
//! hook reads it when `migrate` is gone; `migrate resolve` settles an
//! interrupted migration from it.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use migrate_common::record::{self, RecordError, SourcePhase, SourceRecord};
use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("container {id} is being migrated by another `migrate` process (lock {lock})")]
    Busy { id: String, lock: PathBuf },
    #[error(
        "an earlier migration of {id} to {destination} took its decision but did not finish: \
         run `migrate resolve {id}` first"
    )]
    Unresolved { id: String, destination: String },
    #[error("opening the lock file {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Where the record of container `id` lives.
pub fn record_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("migrations").join(format!("{id}.json"))
}

fn lock_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("migrations").join(format!("{id}.lock"))
}

/// A record this process owns, with the lock that says so.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    record: SourceRecord,
    _lock: Flock<File>,
}

/// What an opened journal found from an earlier migration.
#[derive(Debug)]
pub enum Earlier {
    /// None, or one that settled.
    Nothing,
    /// One interrupted before its decision: the source copy was resumed (or
    /// never frozen) and the destination may still hold a copy, not
    /// running, that must be discarded before a new migration starts.
    Undecided(SourceRecord),
}

impl Journal {
    /// Takes the lock for container `id`; fails if another process holds it
    /// or an earlier migration's decision is not settled.
    pub fn lock(state_dir: &Path, id: &str) -> Result<(Self, Earlier), JournalError> {
        let (journal, earlier) = Self::lock_any(state_dir, id)?;
        let found = match earlier {
            Some(rec) if rec.phase == SourcePhase::Decided => {
                return Err(JournalError::Unresolved {
                    id: id.to_owned(),
                    destination: rec.destination,
                })
            }
            Some(rec) if matches!(rec.phase, SourcePhase::Started | SourcePhase::Aborted) => {
                Earlier::Undecided(rec)
            }
            _ => Earlier::Nothing,
        };
        Ok((journal, found))
    }

    /// Takes the lock for container `id` and returns the record found
    /// there, whatever it says (`migrate resolve`).
    pub fn lock_any(
        state_dir: &Path,
        id: &str,
    ) -> Result<(Self, Option<SourceRecord>), JournalError> {
        let lock = lock_path(state_dir, id);
        let dir = lock.parent().unwrap_or(state_dir);
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Lock {
            path: dir.to_owned(),
            source,
        })?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|source| JournalError::Lock {
                path: lock.clone(),
                source,
            })?;
        let held =
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| JournalError::Busy {
                id: id.to_owned(),
                lock: lock.clone(),
            })?;
        let path = record_path(state_dir, id);
        let earlier = record::load::<SourceRecord>(&path)?;
        let record = earlier.clone().unwrap_or_else(|| SourceRecord {
            migration_id: String::new(),
            container_id: id.to_owned(),
            destination: String::new(),
            mode: String::new(),
            phase: SourcePhase::Done,
            holder_pid: None,
            work_dir: None,
        });
        Ok((
            Self {
                path,
                record,
                _lock: held,
            },
            earlier,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self) -> &SourceRecord {
        &self.record
    }

    /// Starts the record of a new migration: no decision yet.
    pub fn start(
        &mut self,
        migration_id: &str,
        destination: &str,
        mode: &str,
    ) -> Result<(), JournalError> {
        self.record = SourceRecord {
            migration_id: migration_id.to_owned(),
            container_id: self.record.container_id.clone(),
            destination: destination.to_owned(),
            mode: mode.to_owned(),
            phase: SourcePhase::Started,
            holder_pid: None,
            work_dir: None,
        };
        self.write()
    }

    /// Moves the record to `phase`, durably, before returning.
    pub fn set_phase(&mut self, phase: SourcePhase) -> Result<(), JournalError> {
        self.record.phase = phase;
        self.write()
    }

    pub fn set_holder(&mut self, pid: Option<u32>) -> Result<(), JournalError> {
        self.record.holder_pid = pid;
        self.write()
    }

    pub fn set_work_dir(&mut self, dir: &Path) -> Result<(), JournalError> {
        self.record.work_dir = Some(dir.to_owned());
        self.write()
    }

    /// The migration settled: nothing is left to decide.
    pub fn remove(self) -> Result<(), JournalError> {
        record::remove(&self.path)?;
        Ok(())
    }

    fn write(&self) -> Result<(), JournalError> {
        record::store(&self.path, &self.record)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_process_at_a_time_and_a_decision_blocks_the_next_migration() {
        let dir = tempfile::tempdir().unwrap();
        let (mut first, earlier) = Journal::lock(dir.path(), "web").unwrap();
        assert!(matches!(earlier, Earlier::Nothing));
        first.start("m1", "dst:7070", "post-copy").unwrap();
        // flock locks belong to the open file description: a second open,
        // even in this process, is refused while the first is held.
        assert!(matches!(
            Journal::lock(dir.path(), "web"),
            Err(JournalError::Busy { .. })
        ));
        first.set_phase(SourcePhase::Decided).unwrap();
        drop(first);
        assert!(matches!(
            Journal::lock(dir.path(), "web"),
            Err(JournalError::Unresolved { .. })
        ));
    }

    #[test]
    fn an_interrupted_undecided_migration_is_reported_and_a_settled_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (mut first, _) = Journal::lock(dir.path(), "db").unwrap();
        first.start("m1", "dst:7070", "stop-and-copy").unwrap();
        drop(first);
        let (second, earlier) = Journal::lock(dir.path(), "db").unwrap();
        match earlier {
            Earlier::Undecided(rec) => assert_eq!(rec.migration_id, "m1"),
            Earlier::Nothing => panic!("the undecided record was not reported"),
        }
        second.remove().unwrap();
        let (_, earlier) = Journal::lock(dir.path(), "db").unwrap();
        assert!(matches!(earlier, Earlier::Nothing));
        assert!(!record_path(dir.path(), "db").exists());
    }
}
