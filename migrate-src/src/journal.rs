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
    #[error("listing the records in {path}")]
    List {
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

/// Where `migrate cancel` asks the migration of container `id` to end
/// ([`crate::signals`]); removed by whoever takes the lock next.
pub fn cancel_request_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("migrations").join(format!("{id}.cancel"))
}

fn lock_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("migrations").join(format!("{id}.lock"))
}

/// The process holding the lock of container `id`'s record, read from
/// `/proc/locks` rather than by trying the lock: a probe that took it,
/// even for a moment, would make a `migrate` starting then fail as busy.
pub fn lock_holder(state_dir: &Path, id: &str) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(lock_path(state_dir, id)).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let dev = meta.dev();
    flock_holder(
        &locks,
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        meta.ino(),
    )
}

/// The pid holding a flock on the inode `ino` of device `major:minor` in a
/// `/proc/locks` text. Waiters (`->` lines) hold nothing.
pub fn flock_holder(locks: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    let wanted = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, inode, ..] if *inode == wanted => pid.parse().ok(),
            _ => None,
        }
    })
}

/// A record found by [`records`]: its container id, and what it says.
pub type ListedRecord = (String, Result<SourceRecord, RecordError>);

/// Every record under `state_dir`, by container id, in id order; records
/// that cannot be read come back as their error, so that a listing shows
/// them rather than hiding them.
pub fn records(state_dir: &Path) -> Result<Vec<ListedRecord>, JournalError> {
    let dir = state_dir.join("migrations");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(JournalError::List { path: dir, source }),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        match record::load::<SourceRecord>(&entry.path()) {
            Ok(Some(record)) => found.push((id.to_owned(), Ok(record))),
            // Removed since the listing: that migration settled.
            Ok(None) => {}
            Err(e) => found.push((id.to_owned(), Err(e))),
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
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
        // A request left by a cancel whose migration ended first must not
        // end this one.
        let _ = std::fs::remove_file(cancel_request_path(state_dir, id));
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
            agent_pid: None,
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
            // `migrate cancel` signals this process, the lock's holder.
            agent_pid: Some(std::process::id()),
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
    fn the_lock_holder_is_read_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 99 fd:01:1234 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 77 fd:01:555 0 EOF\n";
        assert_eq!(flock_holder(locks, 0xfd, 1, 1234), Some(4242));
        assert_eq!(flock_holder(locks, 0xfd, 1, 555), None);
        assert_eq!(flock_holder(locks, 0xfd, 2, 1234), None);
    }

    #[test]
    fn a_held_lock_names_this_process_and_a_released_one_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::lock(dir.path(), "web").unwrap();
        journal.start("m1", "dst:7070", "auto").unwrap();
        assert_eq!(journal.record().agent_pid, Some(std::process::id()));
        assert_eq!(lock_holder(dir.path(), "web"), Some(std::process::id()));
        let listed = records(dir.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.as_ref().unwrap().migration_id, "m1");
        drop(journal);
        assert_eq!(lock_holder(dir.path(), "web"), None);
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
