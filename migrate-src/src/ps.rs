//! `migrate ps`: the containers of a runc root, their sizes, and whether
//! each could be live-migrated now and, if not, why. The reasons are the
//! ones a migration would refuse with ([`crate::inspect`]'s blockers),
//! checked the same way, plus the source's records: a container another
//! `migrate` works on, or whose migration is in doubt, cannot move again.
//! Nothing here changes a container, and layers are not hashed.

use std::path::Path;

use migrate_common::bundle::BundleConfig;
use migrate_common::record::SourcePhase;
use migrate_common::rootfs::{tree_size, OverlayMount};
use migrate_common::runc::{ContainerState, Runc, RuncError};
use serde::Serialize;

use crate::inspect::{self, Blocker};
use crate::journal;

#[derive(Debug, thiserror::Error)]
pub enum PsError {
    #[error("listing the containers")]
    List(#[from] RuncError),
}

/// One container as `migrate ps` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PsEntry {
    pub id: String,
    /// runc's status: running, paused, stopped, created.
    pub status: String,
    pub pid: u32,
    /// The container cgroup's memory charge (v2 `memory.current`).
    pub memory_bytes: Option<u64>,
    /// Bytes in the overlay's upper dir: what crosses besides memory and
    /// the layers the destination lacks.
    pub upper_bytes: Option<u64>,
    pub lower_layers: Option<usize>,
    pub migratable: bool,
    /// Empty when migratable.
    pub why_not: Vec<WhyNot>,
}

/// One reason a container cannot move now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WhyNot {
    /// A few words.
    pub reason: String,
    /// The whole sentence, with what to do.
    pub detail: String,
}

impl WhyNot {
    fn blocker(blocker: &Blocker, id: &str) -> Self {
        Self {
            reason: blocker.short(),
            detail: blocker.explain(id),
        }
    }
}

/// Every container of `runc`'s root, in `runc list` order.
pub fn ps(runc: &Runc, state_dir: &Path) -> Result<Vec<PsEntry>, PsError> {
    Ok(runc
        .list()?
        .into_iter()
        .map(|state| entry(state, state_dir))
        .collect())
}

fn entry(state: ContainerState, state_dir: &Path) -> PsEntry {
    let id = state.id.clone();
    let mut why_not = Vec::new();
    if let Some(blocker) = inspect::running_blocker(&state) {
        why_not.push(WhyNot::blocker(&blocker, &id));
    }
    let running = state.is_running();
    // A stopped container has no process to look at.
    let alive = state.pid != 0 && state.status != "stopped";
    let config = std::fs::read_to_string(state.bundle.join("config.json"))
        .map_err(|e| format!("reading config.json: {e}"))
        .and_then(|text| BundleConfig::parse(&text).map_err(|e| format!("config.json: {e}")));
    let config = match config {
        Ok(config) => Some(config),
        Err(e) => {
            why_not.push(WhyNot {
                reason: "config.json unreadable".into(),
                detail: format!("the container's bundle {}: {e}", state.bundle.display()),
            });
            None
        }
    };
    if let Some(blocker) = config.as_ref().and_then(inspect::terminal_blocker) {
        why_not.push(WhyNot::blocker(&blocker, &id));
    }
    let holder = journal::lock_holder(state_dir, &id);
    if running {
        if let Some(blocker) = inspect::stdio_blocker(state.pid) {
            why_not.push(WhyNot::blocker(&blocker, &id));
        }
        // A migration freezes the container's tasks: they are not stopped
        // by anyone else.
        match inspect::stopped_blocker(state.pid).map(|b| b.filter(|_| holder.is_none())) {
            Ok(Some(blocker)) => why_not.push(WhyNot::blocker(&blocker, &id)),
            Ok(None) => {}
            Err(e) => why_not.push(WhyNot {
                reason: "tasks unreadable".into(),
                detail: format!("looking for stopped tasks in container {id}: {e}"),
            }),
        }
    }
    let overlay = config.as_ref().map(|config| {
        config
            .root_path(&state.bundle)
            .map_err(|e| e.to_string())
            .and_then(|rootfs| OverlayMount::find(&rootfs).map_err(|e| e.to_string()))
    });
    let overlay = match overlay {
        Some(Ok(overlay)) => Some(overlay),
        Some(Err(e)) => {
            why_not.push(WhyNot {
                reason: "rootfs not an overlay".into(),
                detail: format!(
                    "container {id}'s rootfs must be an overlay mount (lower layers and an upper dir): {e}"
                ),
            });
            None
        }
        None => None,
    };
    why_not.extend(held(state_dir, &id, holder));
    PsEntry {
        memory_bytes: alive
            .then(|| inspect::cgroup_memory_bytes(state.pid))
            .flatten(),
        upper_bytes: overlay.as_ref().and_then(|o| tree_size(&o.upper).ok()),
        lower_layers: overlay.as_ref().map(|o| o.lowers.len()),
        migratable: why_not.is_empty(),
        why_not,
        id,
        status: state.status,
        pid: state.pid,
    }
}

/// What the source's records say against moving container `id` now, given
/// the process holding its record's lock.
fn held(state_dir: &Path, id: &str, holder: Option<u32>) -> Option<WhyNot> {
    if let Some(pid) = holder {
        return Some(WhyNot {
            reason: format!("being migrated (migrate pid {pid})"),
            detail: format!(
                "a `migrate` process (pid {pid}) works on {id}; `migrate status` shows where it stands"
            ),
        });
    }
    let record = migrate_common::record::load::<migrate_common::record::SourceRecord>(
        &journal::record_path(state_dir, id),
    );
    match record {
        Ok(Some(rec)) if rec.phase == SourcePhase::Decided => Some(WhyNot {
            reason: "migration in doubt".into(),
            detail: format!(
                "a migration of {id} to {} took its decision and did not finish: run `migrate resolve {id}`",
                rec.destination
            ),
        }),
        _ => None,
    }
}

/// The text table `migrate ps` prints.
pub fn table(entries: &[PsEntry]) -> String {
    use indicatif::HumanBytes;
    use std::fmt::Write as _;
    let width = entries.iter().map(|e| e.id.len()).max().unwrap_or(2).max(2);
    let mut out = format!(
        "{:<width$}  {:<8}  {:>10}  {:>10}  MIGRATABLE\n",
        "ID", "STATUS", "MEMORY", "UPPER"
    );
    let size = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), |b| HumanBytes(b).to_string());
    for e in entries {
        let verdict = if e.migratable {
            "yes".to_owned()
        } else {
            let reasons: Vec<&str> = e.why_not.iter().map(|w| w.reason.as_str()).collect();
            format!("no: {}", reasons.join("; "))
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<8}  {:>10}  {:>10}  {verdict}",
            e.id,
            e.status,
            size(e.memory_bytes),
            size(e.upper_bytes)
        );
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn state(id: &str, status: &str, bundle: &Path) -> ContainerState {
        ContainerState {
            id: id.into(),
            pid: 0,
            status: status.into(),
            bundle: bundle.to_owned(),
            rootfs: bundle.join("rootfs"),
        }
    }

    #[test]
    fn a_stopped_container_without_bundle_says_every_reason() {
        let state_dir = tempfile::tempdir().unwrap();
        let e = entry(
            state("db", "stopped", Path::new("/nonexistent")),
            state_dir.path(),
        );
        assert!(!e.migratable);
        let reasons: Vec<&str> = e.why_not.iter().map(|w| w.reason.as_str()).collect();
        assert_eq!(reasons, ["stopped, not running", "config.json unreadable"]);
        assert_eq!(e.memory_bytes, None);
        let text = table(&[e]);
        assert!(
            text.contains("db  stopped            -           -  no: stopped, not running;"),
            "{text}"
        );
    }

    #[test]
    fn a_decided_record_holds_the_container() {
        let state_dir = tempfile::tempdir().unwrap();
        let mut rec = migrate_common::record::SourceRecord {
            migration_id: "m".into(),
            container_id: "web".into(),
            destination: "dst:7070".into(),
            mode: "post-copy".into(),
            phase: SourcePhase::Started,
            holder_pid: None,
            work_dir: None,
            agent_pid: None,
        };
        let path = journal::record_path(state_dir.path(), "web");
        migrate_common::record::store(&path, &rec).unwrap();
        assert_eq!(held(state_dir.path(), "web", None), None);
        let live = held(state_dir.path(), "web", Some(7)).unwrap();
        assert_eq!(live.reason, "being migrated (migrate pid 7)");
        rec.phase = SourcePhase::Decided;
        migrate_common::record::store(&path, &rec).unwrap();
        let why = held(state_dir.path(), "web", None).unwrap();
        assert_eq!(why.reason, "migration in doubt");
        assert!(why.detail.contains("migrate resolve web"));
    }
}
