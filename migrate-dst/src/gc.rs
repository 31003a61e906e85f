//! Garbage collection of the layer store: `migrate-dst gc` removes the
//! layers no container uses, and the daemon's `--layer-store-max` and
//! `--layer-max-age` remove unused ones, least recently used first, at
//! start and after each migration.
//!
//! A layer is in use while a container dir (`<state>/containers/<id>/`)
//! names it in its `layers.json`, or while an overlay mounted on this host
//! has it as a lower dir (which also covers container dirs written before
//! `layers.json` existed). The danger is the gap between a preflight
//! telling the source "I have this layer, don't send it" and the restore
//! mounting it: a collection in that gap would leave the restore without
//! its layer. So:
//!
//! - the preflight takes the store's lock *shared* before it looks up any
//!   layer, and releases it only after it has claimed the container dir and
//!   written `layers.json` (every layer of the container, present or still
//!   to come) into it;
//! - a collection takes the lock *exclusively* to read the in-use set and
//!   take its victims out of the store (a rename, so a lookup can no longer
//!   find them), then removes them after releasing it.
//!
//! A preflight therefore either ran wholly before the collection (and its
//! `layers.json` is read by it) or wholly after (and finds the layer gone,
//! and asks for it). A layer that arrives during a migration is named in
//! that migration's `layers.json` from its preflight on. The dir, and with
//! it the reference, goes when the container is discarded, or, for a
//! container deleted from runc after it ran here, when the daemon's next
//! start removes its stale dir. A `layers.json` that does not parse stops
//! the collection: an unknown reference must not be guessed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use migrate_common::protocol::LayerInfo;
use migrate_common::record::{self, RecordError};
use migrate_common::rootfs::digest::LayerDigest;
use migrate_common::rootfs::{mountinfo, overlay::OverlayMount, tree_size};
use serde::{Deserialize, Serialize};

use crate::restore::{self, ContainerDir};
use crate::store::{self, LayerStore};
use crate::Daemon;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("the layer store")]
    Store(#[source] anyhow::Error),
    #[error("listing the container dirs in {path}")]
    Containers {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} cannot be read, so which layers it uses is unknown; nothing was removed")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: RecordError,
    },
    #[error("reading this host's mounts")]
    Mounts(#[from] mountinfo::MountInfoError),
    #[error("recording the layers of {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: RecordError,
    },
}

/// `<state>/containers/<id>/layers.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LayersFile {
    pub layers: Vec<String>,
}

/// How big and how old the unused part of the store may grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// The whole store's bytes, layers in use included.
    pub max_bytes: Option<u64>,
    /// Since a migration last used a layer.
    pub max_age: Option<Duration>,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        self.max_bytes.is_none() && self.max_age.is_none()
    }
}

/// What a collection knows of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerFacts {
    pub digest: String,
    pub bytes: u64,
    pub last_used: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// No container uses it (`migrate-dst gc` without limits).
    Unused,
    /// Unused, and not used for longer than `--layer-max-age`.
    TooOld,
    /// Unused, and the store is over `--layer-store-max`.
    OverSize,
}

/// Which layers to remove, and why: with no limits every unused one; with
/// limits the unused ones past the age limit, then the least recently used
/// unused ones until the store fits its size limit. In-use layers are never
/// chosen, even when the store cannot fit without them.
pub fn select(
    layers: &[LayerFacts],
    in_use: &HashSet<String>,
    limits: &Limits,
    now: SystemTime,
) -> Vec<(String, Reason)> {
    let mut unused: Vec<&LayerFacts> = layers
        .iter()
        .filter(|l| !in_use.contains(&l.digest))
        .collect();
    if limits.is_none() {
        return unused
            .into_iter()
            .map(|l| (l.digest.clone(), Reason::Unused))
            .collect();
    }
    unused.sort_by_key(|l| l.last_used);
    let mut total: u64 = layers.iter().map(|l| l.bytes).sum();
    let mut chosen = Vec::new();
    for layer in unused {
        let age = now.duration_since(layer.last_used).unwrap_or_default();
        let reason = if limits.max_age.is_some_and(|max| age > max) {
            Reason::TooOld
        } else if limits.max_bytes.is_some_and(|max| total > max) {
            Reason::OverSize
        } else {
            continue;
        };
        total = total.saturating_sub(layer.bytes);
        chosen.push((layer.digest.clone(), reason));
    }
    chosen
}

/// One layer a collection removed (or, dry, would remove).
#[derive(Debug, Clone, Serialize)]
pub struct Removed {
    pub digest: String,
    pub bytes: u64,
    /// Seconds since a migration last used it.
    pub unused_s: u64,
    pub reason: Reason,
}

/// What a collection did.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub removed: Vec<Removed>,
    pub bytes_removed: u64,
    pub layers_kept: usize,
    pub layers_in_use: usize,
    pub bytes_kept: u64,
}

/// Collects the store of the daemon whose state dir is `state_dir`.
pub fn collect(
    store: &LayerStore,
    state_dir: &Path,
    limits: &Limits,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    // Measured before the lock: walking every layer takes a while, and a
    // layer that arrives meanwhile is not a candidate.
    let mut facts = Vec::new();
    for digest in store.list().map_err(GcError::Store)? {
        let path = store.path(&digest);
        facts.push(LayerFacts {
            bytes: tree_size(&path).unwrap_or(0),
            last_used: store.last_used(&digest).map_err(GcError::Store)?,
            digest: digest.to_string(),
        });
    }
    let now = SystemTime::now();
    let lock = store.lock_exclusive().map_err(GcError::Store)?;
    let in_use = in_use(store, state_dir)?;
    let chosen = select(&facts, &in_use, limits, now);
    let mut taken_out = Vec::new();
    let mut removed = Vec::new();
    for (digest, reason) in chosen {
        let Some(fact) = facts.iter().find(|f| f.digest == digest) else {
            continue;
        };
        let parsed = LayerDigest::parse(&digest).map_err(|e| GcError::Store(e.into()))?;
        if !store.has(&parsed) {
            // Another collection took it meanwhile.
            continue;
        }
        if !dry_run {
            taken_out.push(store.take_out(&parsed).map_err(GcError::Store)?);
        }
        removed.push(Removed {
            digest,
            bytes: fact.bytes,
            unused_s: now
                .duration_since(fact.last_used)
                .unwrap_or_default()
                .as_secs(),
            reason,
        });
    }
    drop(lock);
    for dir in taken_out {
        store::discard(&dir);
    }
    let bytes_removed = removed.iter().map(|r| r.bytes).sum();
    let total: u64 = facts.iter().map(|f| f.bytes).sum();
    Ok(GcReport {
        dry_run,
        layers_kept: facts.len() - removed.len(),
        layers_in_use: facts.iter().filter(|f| in_use.contains(&f.digest)).count(),
        bytes_kept: total - bytes_removed,
        bytes_removed,
        removed,
    })
}

/// The layers some container dir names or some overlay mount uses.
fn in_use(store: &LayerStore, state_dir: &Path) -> Result<HashSet<String>, GcError> {
    let mut used = HashSet::new();
    let parent = state_dir.join("containers");
    match std::fs::read_dir(&parent) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let dir = ContainerDir { root: entry.path() };
                let path = dir.layers();
                match record::load::<LayersFile>(&path) {
                    Ok(Some(file)) => used.extend(file.layers),
                    // Written before layers.json existed: its mounts say.
                    Ok(None) => {}
                    Err(source) => return Err(GcError::Unreadable { path, source }),
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(GcError::Containers {
                path: parent,
                source,
            })
        }
    }
    // Overlay shows its lower dirs as they were given at mount: the store's
    // path as the daemon was told it, or resolved.
    let roots = [
        store.root().to_owned(),
        std::fs::canonicalize(store.root()).unwrap_or_else(|_| store.root().to_owned()),
    ];
    for entry in mountinfo::read_own()? {
        if entry.fs_type != "overlay" {
            continue;
        }
        let Ok(mount) = OverlayMount::from_options(&entry.mount_point, &entry.super_options) else {
            continue;
        };
        for lower in mount.lowers {
            if lower.parent().is_some_and(|p| roots.iter().any(|r| r == p)) {
                if let Some(name) = lower.file_name() {
                    used.insert(name.to_string_lossy().into_owned());
                }
            }
        }
    }
    Ok(used)
}

/// Claims container dir `id` for a migration ([`ContainerDir::claim`])
/// and names in it every layer the container uses. Called by the preflight
/// with the store's lock held shared since it looked the layers up (see the
/// module doc).
pub fn claim(daemon: &Daemon, id: &str, layers: &[LayerInfo]) -> anyhow::Result<ContainerDir> {
    let digests = layers
        .iter()
        .map(|l| LayerDigest::parse(&l.digest))
        .collect::<Result<Vec<_>, _>>()?;
    let dir = ContainerDir::claim(&daemon.state_dir, &daemon.images, id)?;
    if let Err(e) = record_use(&daemon.store, &dir, &digests) {
        restore::discard(daemon, id, &dir);
        return Err(e.into());
    }
    Ok(dir)
}

/// Writes the layers a claimed container dir will use, and marks them used
/// now. Called with the store's lock held shared (see the module doc).
pub fn record_use(
    store: &LayerStore,
    dir: &ContainerDir,
    layers: &[LayerDigest],
) -> Result<(), GcError> {
    let path = dir.layers();
    let file = LayersFile {
        layers: layers.iter().map(ToString::to_string).collect(),
    };
    record::store(&path, &file).map_err(|source| GcError::Record { path, source })?;
    for digest in layers {
        // A layer still to come has no marker until it arrives; its
        // arrival time stands for its use until the next migration.
        if store.has(digest) {
            store.touch(digest).map_err(GcError::Store)?;
        }
    }
    Ok(())
}

impl GcReport {
    /// Lines for people.
    pub fn lines(&self) -> Vec<String> {
        use indicatif::{HumanBytes, HumanDuration};
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        let mut lines: Vec<String> = self
            .removed
            .iter()
            .map(|r| {
                let why = match r.reason {
                    Reason::Unused => "no container uses it",
                    Reason::TooOld => "unused longer than --layer-max-age",
                    Reason::OverSize => "the store is over --layer-store-max",
                };
                format!(
                    "{verb} {} ({}, last used {} ago): {why}",
                    r.digest,
                    HumanBytes(r.bytes),
                    HumanDuration(Duration::from_secs(r.unused_s))
                )
            })
            .collect();
        lines.push(format!(
            "{verb} {} layer(s), {}; kept {} layer(s), {} ({} in use)",
            self.removed.len(),
            HumanBytes(self.bytes_removed),
            self.layers_kept,
            HumanBytes(self.bytes_kept),
            self.layers_in_use
        ));
        lines
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn layer(name: &str, bytes: u64, hours_ago: u64, now: SystemTime) -> LayerFacts {
        LayerFacts {
            digest: name.into(),
            bytes,
            last_used: now - HOUR * u32::try_from(hours_ago).unwrap(),
        }
    }

    #[test]
    fn without_limits_every_unused_layer_goes() {
        let now = SystemTime::now();
        let layers = [layer("a", 10, 1, now), layer("b", 10, 1, now)];
        let in_use = HashSet::from(["a".to_owned()]);
        assert_eq!(
            select(&layers, &in_use, &Limits::default(), now),
            [("b".to_owned(), Reason::Unused)]
        );
    }

    #[test]
    fn the_size_limit_removes_least_recently_used_unused_layers_first() {
        let now = SystemTime::now();
        let layers = [
            layer("used", 50, 100, now),
            layer("old", 30, 10, now),
            layer("older", 30, 20, now),
            layer("new", 30, 1, now),
        ];
        let in_use = HashSet::from(["used".to_owned()]);
        let limits = Limits {
            max_bytes: Some(100),
            max_age: None,
        };
        // 140 bytes: "older" goes (110), then "old" (80); "new" stays.
        assert_eq!(
            select(&layers, &in_use, &limits, now),
            [
                ("older".to_owned(), Reason::OverSize),
                ("old".to_owned(), Reason::OverSize)
            ]
        );
        // Layers in use never go, even when the store cannot fit.
        let tiny = Limits {
            max_bytes: Some(1),
            max_age: None,
        };
        let chosen = select(&layers, &in_use, &tiny, now);
        assert_eq!(chosen.len(), 3);
        assert!(chosen.iter().all(|(d, _)| d != "used"));
    }

    #[test]
    fn the_age_limit_removes_unused_layers_older_than_it() {
        let now = SystemTime::now();
        let layers = [
            layer("a", 1, 48, now),
            layer("b", 1, 2, now),
            layer("c", 1, 72, now),
        ];
        let in_use = HashSet::from(["c".to_owned()]);
        let limits = Limits {
            max_bytes: Some(1000),
            max_age: Some(24 * HOUR),
        };
        assert_eq!(
            select(&layers, &in_use, &limits, now),
            [("a".to_owned(), Reason::TooOld)]
        );
    }
}
