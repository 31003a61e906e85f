//! `migrate status`: the migrations this host's records know of, and where
//! each stands: in progress (a live `migrate` holds its record's lock), in
//! doubt (decided, not finished, nobody working on it) or interrupted
//! (started, nobody working on it), with the `migrate resolve` that
//! settles it. Read from `<state-dir>/migrations/` without taking a lock.

use std::path::Path;

use migrate_common::record::{SourcePhase, SourceRecord};
use serde::Serialize;

use crate::journal::{self, JournalError};

/// Where `migrate` keeps its records unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/migrate";

/// Where one migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    /// A live `migrate` (or `migrate resolve`) works on it.
    InProgress,
    /// Decided and not finished: a copy may be held on either side.
    InDoubt,
    /// Stopped before its decision: the container runs here, the
    /// destination may hold a copy that never runs.
    Interrupted,
    /// Finished; the record was not removed yet.
    Done,
    /// The record cannot be read.
    Unreadable,
}

/// One migration as `migrate status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationStatus {
    pub container: String,
    pub migration_id: Option<String>,
    pub destination: Option<String>,
    pub mode: Option<String>,
    pub phase: Option<SourcePhase>,
    pub standing: Standing,
    /// The process holding the record's lock, while one does.
    pub pid: Option<u32>,
    /// The command that settles it, when nobody works on it.
    pub resolve: Option<String>,
    pub error: Option<String>,
}

impl MigrationStatus {
    pub fn line(&self) -> String {
        let to = self.destination.as_deref().unwrap_or("?");
        let mode = self.mode.as_deref().unwrap_or("?");
        let phase = self.phase.map_or("?", phase_name);
        let what = match self.standing {
            Standing::InProgress => match self.pid {
                Some(pid) => format!("in progress ({phase}), migrate pid {pid}"),
                None => format!("in progress ({phase})"),
            },
            Standing::InDoubt => "IN DOUBT: decided, not finished".to_owned(),
            Standing::Interrupted => format!("interrupted before its decision ({phase})"),
            Standing::Done => "done".to_owned(),
            Standing::Unreadable => format!(
                "record unreadable: {}",
                self.error.as_deref().unwrap_or("?")
            ),
        };
        let mut line = format!("{} to {to} ({mode}): {what}", self.container);
        if let Some(id) = &self.migration_id {
            line.push_str(&format!(" [migration {id}]"));
        }
        if let Some(cmd) = &self.resolve {
            line.push_str(&format!("\n  run: {cmd}"));
        }
        line
    }
}

fn phase_name(phase: SourcePhase) -> &'static str {
    match phase {
        SourcePhase::Started => "started",
        SourcePhase::Decided => "decided",
        SourcePhase::Aborted => "aborted",
        SourcePhase::Done => "done",
    }
}

/// Every migration recorded under `state_dir`, by container id.
pub fn status(state_dir: &Path) -> Result<Vec<MigrationStatus>, JournalError> {
    Ok(journal::records(state_dir)?
        .into_iter()
        .map(|(id, record)| {
            let holder = journal::lock_holder(state_dir, &id);
            match record {
                Ok(rec) => of_record(&rec, holder, state_dir),
                Err(e) => MigrationStatus {
                    resolve: None,
                    container: id,
                    migration_id: None,
                    destination: None,
                    mode: None,
                    phase: None,
                    standing: Standing::Unreadable,
                    pid: holder,
                    error: Some(format!("{:#}", anyhow::Error::from(e))),
                },
            }
        })
        .collect())
}

/// Where a record stands, given the process holding its lock if any.
pub fn of_record(rec: &SourceRecord, holder: Option<u32>, state_dir: &Path) -> MigrationStatus {
    let standing = match (holder, rec.phase) {
        (Some(_), _) => Standing::InProgress,
        (None, SourcePhase::Decided) => Standing::InDoubt,
        (None, SourcePhase::Started | SourcePhase::Aborted) => Standing::Interrupted,
        (None, SourcePhase::Done) => Standing::Done,
    };
    let resolve = matches!(standing, Standing::InDoubt | Standing::Interrupted)
        .then(|| resolve_command(rec, state_dir));
    MigrationStatus {
        container: rec.container_id.clone(),
        migration_id: Some(rec.migration_id.clone()),
        destination: Some(rec.destination.clone()),
        mode: Some(rec.mode.clone()),
        phase: Some(rec.phase),
        standing,
        pid: holder,
        resolve,
        error: None,
    }
}

/// The `migrate resolve` that settles `rec` (see [`crate::resolve`]): a
/// lazy migration that decided can only go back.
fn resolve_command(rec: &SourceRecord, state_dir: &Path) -> String {
    let mut cmd = format!("migrate resolve {}", rec.container_id);
    if state_dir != Path::new(DEFAULT_STATE_DIR) {
        cmd.push_str(&format!(" --state-dir {}", state_dir.display()));
    }
    let lazy = matches!(rec.mode.as_str(), "post-copy" | "hybrid");
    if lazy && rec.phase == SourcePhase::Decided {
        cmd.push_str(" --go-back");
    }
    cmd
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(phase: SourcePhase, mode: &str) -> SourceRecord {
        SourceRecord {
            migration_id: "m1".into(),
            container_id: "web".into(),
            destination: "dst:7070".into(),
            mode: mode.into(),
            phase,
            holder_pid: None,
            work_dir: None,
            agent_pid: Some(12),
        }
    }

    #[test]
    fn standing_follows_the_lock_and_the_phase() {
        let dir = Path::new(DEFAULT_STATE_DIR);
        let live = of_record(&rec(SourcePhase::Decided, "stop-and-copy"), Some(12), dir);
        assert_eq!(
            (live.standing, live.resolve.clone()),
            (Standing::InProgress, None)
        );
        assert!(live
            .line()
            .contains("in progress (decided), migrate pid 12"));
        let doubt = of_record(&rec(SourcePhase::Decided, "stop-and-copy"), None, dir);
        assert_eq!(doubt.standing, Standing::InDoubt);
        assert_eq!(doubt.resolve.as_deref(), Some("migrate resolve web"));
        let lazy = of_record(&rec(SourcePhase::Decided, "post-copy"), None, dir);
        assert_eq!(
            lazy.resolve.as_deref(),
            Some("migrate resolve web --go-back")
        );
        let other = Path::new("/srv/m");
        let cut = of_record(&rec(SourcePhase::Started, "post-copy"), None, other);
        assert_eq!(cut.standing, Standing::Interrupted);
        assert_eq!(
            cut.resolve.as_deref(),
            Some("migrate resolve web --state-dir /srv/m")
        );
        assert!(cut.line().contains("run: migrate resolve web"));
    }

    #[test]
    fn the_listing_reads_records_and_reports_broken_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = journal::record_path(dir.path(), "web");
        migrate_common::record::store(&path, &rec(SourcePhase::Started, "auto")).unwrap();
        std::fs::write(journal::record_path(dir.path(), "bad"), "{").unwrap();
        let listed = status(dir.path()).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].standing, Standing::Unreadable);
        assert_eq!(listed[1].standing, Standing::Interrupted);
        assert_eq!(listed[1].pid, None);
    }
}
