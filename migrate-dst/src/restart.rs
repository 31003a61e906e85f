//! At start-up: the copies an earlier run of this daemon left behind, found
//! from their records (`<state>/containers/<id>/migration.json`).
//!
//! - `receiving`: the source was never told of a held copy, so it cannot
//!   have decided for it: a restore still waiting at the hold is told to
//!   undo, and everything made for it goes.
//! - `held`: kept held. Its CRIU hook keeps asking at the hold socket until
//!   a daemon answers; this one binds it again and waits for the source (or
//!   `migrate resolve`) to come back with `Resume` and decide.
//! - `released`: it runs; the source's commit is awaited the same way.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use migrate_common::hook::{Gate, Verdict, POST_RESTORE};
use migrate_common::process::wait_for_exit;
use migrate_common::protocol::DestinationState;
use migrate_common::record::{self, DestinationPhase, DestinationRecord};
use tracing::{error, info, warn};

use crate::hold::{self, Held};
use crate::restore::{self, ContainerDir};
use crate::session::Session;
use crate::Daemon;

/// How long an interrupted restore may take to undo.
const UNDO_BOUND: Duration = Duration::from_secs(30);

/// Adopts every held or released copy; undoes and removes the restores
/// that never reached the hold.
pub async fn adopt(daemon: &Arc<Daemon>) -> Result<Vec<Held>> {
    let mut adopted = Vec::new();
    for (dir, rec) in records(daemon)? {
        let id = rec.container_id.clone();
        match rec.phase {
            DestinationPhase::Receiving => {
                info!(
                    container = id,
                    "a restore interrupted before the hold: undoing it"
                );
                undo_interrupted(daemon, &id, &dir, rec.holder_pid).await;
            }
            DestinationPhase::Held | DestinationPhase::Released => {
                let holder_alive = rec
                    .holder_pid
                    .and_then(|p| i32::try_from(p).ok())
                    .is_some_and(alive);
                let runs = daemon.runc.state(&id).is_ok_and(|s| s.is_running());
                if rec.phase == DestinationPhase::Held && !holder_alive && !runs {
                    error!(
                        container = id,
                        "LOST: the held copy is gone (the host restarted?)"
                    );
                    restore::discard(daemon, &id, &dir);
                    continue;
                }
                match Held::adopted(daemon, dir.clone(), rec) {
                    Ok(held) => {
                        warn!(container = id, phase = ?held.record().phase,
                            "adopted a copy an earlier run held; waiting for its source to decide");
                        adopted.push(held);
                    }
                    Err(e) => error!(container = id, error = %format!("{e:#}"),
                        "cannot adopt the held copy; it stays held by its hook"),
                }
            }
        }
    }
    Ok(adopted)
}

/// Serves an adopted copy until its source settles it.
pub async fn keep_holding(daemon: Arc<Daemon>, held: Held) {
    let rec = held.record().clone();
    let mut session = Session {
        control: None,
        conn: None,
        state: match rec.phase {
            DestinationPhase::Released => DestinationState::AwaitingCommit,
            _ => DestinationState::Held { lazy: rec.lazy },
        },
    };
    if let Err(e) = hold::drive(&mut session, &daemon, held).await {
        warn!(container = rec.container_id, error = ?e, "adopted copy");
    }
}

/// The containers' records, with their dirs.
pub fn records(daemon: &Daemon) -> Result<Vec<(ContainerDir, DestinationRecord)>> {
    let parent = daemon.state_dir.join("containers");
    let entries = match std::fs::read_dir(&parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", parent.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let dir = ContainerDir {
            root: entry?.path(),
        };
        match record::load::<DestinationRecord>(&dir.record()) {
            Ok(Some(rec)) => found.push((dir, rec)),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "unreadable record; leaving its container as it is"),
        }
    }
    Ok(found)
}

/// A restore whose hook may still wait at the hold: answer it `undo`, wait
/// for `runc restore` to end, and remove what it made.
async fn undo_interrupted(daemon: &Arc<Daemon>, id: &str, dir: &ContainerDir, holder: Option<u32>) {
    let holder = holder
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| alive(*p));
    if let Some(pid) = holder {
        let socket = dir.hold_socket();
        let _ = std::fs::remove_file(&socket);
        let ended = async {
            let gate = Gate::bind(&socket, POST_RESTORE)?;
            gate.decide(Verdict::Undo);
            anyhow::Ok(wait_for_exit(pid, UNDO_BOUND).await?)
        }
        .await;
        match ended {
            Ok(true) => {}
            Ok(false) => warn!(
                container = id,
                pid, "runc restore has not ended after the undo"
            ),
            Err(e) => {
                warn!(container = id, error = %format!("{e:#}"), "undoing the interrupted restore")
            }
        }
    }
    restore::discard(daemon, id, dir);
}

fn alive(pid: i32) -> bool {
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::Error::ESRCH)
    )
}

/// One line of `migrate-dst status`.
#[derive(Debug, serde::Serialize)]
pub struct StatusEntry {
    pub container: String,
    pub migration: String,
    pub source: Option<String>,
    pub phase: DestinationPhase,
    pub lazy: bool,
    /// Seconds since the record last changed.
    pub since_s: u64,
    /// Held for longer than the bound: only the source (`migrate resolve`)
    /// can settle it.
    pub in_doubt: bool,
    /// Claimed by a preflight, its layers, images and rootfs still
    /// arriving: nothing restored, no record yet (`migration` and `source`
    /// are not known from the disk then).
    pub arriving: bool,
}

impl StatusEntry {
    pub fn line(&self) -> String {
        if self.arriving {
            return format!(
                "{}: receiving its layers, images and rootfs for {}; nothing restored yet",
                self.container,
                humantime::format_duration(Duration::from_secs(self.since_s)),
            );
        }
        let phase = match self.phase {
            DestinationPhase::Receiving => "receiving",
            DestinationPhase::Held => "held, not running",
            DestinationPhase::Released => "released, running; the source's commit not heard yet",
        };
        format!(
            "{} ({}) from {}: {phase} for {}{}{}",
            self.container,
            if self.lazy { "post-copy" } else { "eager" },
            self.source.as_deref().unwrap_or("?"),
            humantime::format_duration(Duration::from_secs(self.since_s)),
            if self.in_doubt {
                " — IN DOUBT: run `migrate resolve` on the source"
            } else {
                ""
            },
            format_args!(" [migration {}]", self.migration),
        )
    }
}

/// What the records under `state_dir` say, without a daemon running.
pub fn status(state_dir: &std::path::Path, in_doubt_after: Duration) -> Result<Vec<StatusEntry>> {
    let parent = state_dir.join("containers");
    let entries = match std::fs::read_dir(&parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", parent.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let dir = ContainerDir {
            root: entry?.path(),
        };
        let since = |path: &std::path::Path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs())
                .unwrap_or_default()
        };
        let rec = match record::load::<DestinationRecord>(&dir.record()) {
            Ok(Some(rec)) => rec,
            // No record before the restore starts; the images go after the
            // commit, so a dir without either runs its container here.
            Ok(None) if dir.images().is_dir() => {
                found.push(StatusEntry {
                    container: dir
                        .root
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    migration: String::new(),
                    source: None,
                    phase: DestinationPhase::Receiving,
                    lazy: false,
                    since_s: since(&dir.layers()),
                    in_doubt: false,
                    arriving: true,
                });
                continue;
            }
            _ => continue,
        };
        let since_s = since(&dir.record());
        found.push(StatusEntry {
            arriving: false,
            in_doubt: rec.phase == DestinationPhase::Held && since_s >= in_doubt_after.as_secs(),
            container: rec.container_id,
            migration: rec.migration_id,
            source: rec.source,
            phase: rec.phase,
            lazy: rec.lazy,
            since_s,
        });
    }
    found.sort_by(|a, b| a.container.cmp(&b.container));
    Ok(found)
}
