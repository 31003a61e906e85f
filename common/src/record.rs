//! Durable records of migrations under way: what each side has decided or
//! holds, written so that they survive a crash of the agent and a reboot.
//!
//! A record is a small JSON file replaced atomically: written to a temporary
//! file beside it, synced, renamed over the old one, and the directory
//! synced, so a reader finds either the old record or the new one, never a
//! torn one, even after power loss. The source's record carries the
//! decision (see [`SourcePhase`]): its CRIU action hook reads it when the
//! agent is gone, and `migrate resolve` settles a migration from it. The
//! destination's says which restored containers it holds.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Largest record read: a few hundred bytes in practice.
const MAX_RECORD_BYTES: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("writing the record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the record {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the record {path} is larger than {MAX_RECORD_BYTES} bytes")]
    TooLarge { path: PathBuf },
}

/// Where the source is in a migration, as far as the container's fate goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourcePhase {
    /// Under way; no decision yet: a failure resumes the source copy.
    Started,
    /// The source decided the destination's copy is the container: its own
    /// copy is ended, never resumed, and the destination is to release its.
    Decided,
    /// Given up before the decision; the source copy runs (or was resumed).
    Aborted,
    /// The destination released its copy and the source cleaned up.
    Done,
}

/// The source's record of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    pub migration_id: String,
    pub container_id: String,
    pub destination: String,
    pub mode: String,
    pub phase: SourcePhase,
    /// The `runc checkpoint` holding the source copy, while one does.
    pub holder_pid: Option<u32>,
    /// The migration's work dir (images, CRIU's logs), removed once the
    /// migration is settled.
    #[serde(default)]
    pub work_dir: Option<std::path::PathBuf>,
    /// The `migrate` process working on the migration: `migrate cancel`
    /// signals it. Absent from records written before it was kept.
    #[serde(default)]
    pub agent_pid: Option<u32>,
}

/// Where the destination is with a container it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestinationPhase {
    /// Images and rootfs arriving; nothing restored.
    Receiving,
    /// Restored and held, not running, until the source says.
    Held,
    /// Released: the container runs here.
    Released,
}

/// The destination's record of one container it received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRecord {
    pub migration_id: String,
    pub container_id: String,
    /// The source's certificate name.
    pub source: Option<String>,
    pub phase: DestinationPhase,
    pub lazy: bool,
    /// The `runc restore` holding the restored copy, while one does.
    pub holder_pid: Option<u32>,
}

/// Replaces the record at `path` with `value`, durably.
pub fn store<T: Serialize>(path: &Path, value: &T) -> Result<(), RecordError> {
    let err = |source| RecordError::Write {
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_vec_pretty(value).map_err(|e| err(std::io::Error::other(e)))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        file.write_all(&text).map_err(err)?;
        file.sync_all().map_err(err)?;
    }
    fs::rename(&tmp, path).map_err(err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// The record at `path`, or `None` if there is none.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, RecordError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RecordError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let len = file
        .metadata()
        .map_err(|source| RecordError::Read {
            path: path.to_owned(),
            source,
        })?
        .len();
    if len > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            path: path.to_owned(),
        });
    }
    serde_json::from_reader(file)
        .map(Some)
        .map_err(|source| RecordError::Parse {
            path: path.to_owned(),
            source,
        })
}

/// Removes the record at `path`, durably; a missing one is fine.
pub fn remove(path: &Path) -> Result<(), RecordError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(RecordError::Write {
                path: path.to_owned(),
                source,
            })
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| RecordError::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(phase: SourcePhase) -> SourceRecord {
        SourceRecord {
            migration_id: "0123".into(),
            container_id: "web1".into(),
            destination: "dst:7070".into(),
            mode: "stop-and-copy".into(),
            phase,
            holder_pid: Some(42),
            work_dir: None,
            agent_pid: Some(7),
        }
    }

    #[test]
    fn records_round_trip_and_replace_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("migrations/web1.json");
        assert_eq!(load::<SourceRecord>(&path).unwrap(), None);
        store(&path, &record(SourcePhase::Started)).unwrap();
        store(&path, &record(SourcePhase::Decided)).unwrap();
        assert_eq!(
            load::<SourceRecord>(&path).unwrap(),
            Some(record(SourcePhase::Decided))
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"phase\": \"decided\""), "{text}");
        assert!(!path.with_extension("json.tmp").exists());
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(load::<SourceRecord>(&path).unwrap(), None);
    }

    #[test]
    fn a_record_without_agent_pid_still_reads() {
        let text = r#"{"migration_id":"m","container_id":"c","destination":"d:1","mode":"auto",
                       "phase":"started","holder_pid":null}"#;
        let rec: SourceRecord = serde_json::from_str(text).unwrap();
        assert_eq!(rec.agent_pid, None);
        assert_eq!(rec.work_dir, None);
    }

    #[test]
    fn broken_and_oversized_records_are_errors_not_guesses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::fs::write(&path, "{\"phase\": \"deci").unwrap();
        assert!(matches!(
            load::<SourceRecord>(&path),
            Err(RecordError::Parse { .. })
        ));
        std::fs::write(&path, vec![b' '; MAX_RECORD_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            load::<SourceRecord>(&path),
            Err(RecordError::TooLarge { .. })
        ));
    }
}
