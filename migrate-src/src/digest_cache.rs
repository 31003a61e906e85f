//! The source's cache of lower-layer digests, so that a second migration
//! of a container from the same image does not hash the image again.
//!
//! `<state-dir>/layer-digests.json` maps a layer's path to its digest and
//! to a fingerprint of its tree: a stat walk (relative paths, types, modes,
//! owners, sizes, mtimes, ctimes, inodes, devices), far cheaper than reading
//! every byte. A layer whose fingerprint matches is taken to be unchanged.
//!
//! Timestamps can be coarse (a file system's granularity, or a change in the
//! same tick as the walk), so a tree that changed just before it was
//! fingerprinted could change again without its fingerprint moving: git's
//! racy-clean rule. An entry is only stored when every timestamp in the
//! tree is more than [`RACY_WINDOW`] older than the walk; otherwise the
//! layer is hashed every time until it has settled. The fingerprint is
//! taken before the hash, so a change during the hash shows in the next
//! walk's ctimes.
//!
//! Several `migrate` processes (a drain's parallel migrations) may save at
//! once: each merges its entries into what is on disk under
//! `layer-digests.lock`, so none loses the others'.
//!
//! The file is local but anyone who can write the state dir could plant it:
//! it is read only up to [`MAX_CACHE_BYTES`], a file that does not parse is
//! ignored (and replaced), and a hit only ever skips hashing a layer the
//! destination verifies again on arrival ([`migrate_common::rootfs::digest`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use migrate_common::record::{self, RecordError};
use migrate_common::rootfs::digest::{layer_digest, DigestError, LayerDigest};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Largest cache file read; an entry is about 250 bytes.
pub const MAX_CACHE_BYTES: u64 = 1 << 20;
/// Entries kept; the least recently used go first.
const MAX_ENTRIES: usize = 1024;
/// Timestamps this close to the walk do not prove the tree settled.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("saving the layer digest cache")]
    Save(#[from] RecordError),
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    fingerprint: String,
    digest: String,
    /// Seconds since the epoch of the last migration that used the entry.
    used_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    layers: BTreeMap<PathBuf, Entry>,
}

/// The cache as loaded; [`DigestCache::save`] writes it back.
#[derive(Debug)]
pub struct DigestCache {
    path: PathBuf,
    file: CacheFile,
}

impl DigestCache {
    /// The cache in `state_dir`; empty if there is none or it is not valid.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("layer-digests.json");
        let file = read_bounded(&path)
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self { path, file }
    }

    /// The digest of the layer at `dir`, and whether it had to be hashed.
    pub fn digest(&mut self, dir: &Path) -> Result<(LayerDigest, bool), CacheError> {
        let now = SystemTime::now();
        let fingerprint = fingerprint(dir, now).ok();
        let known = self.file.layers.get_mut(dir);
        if let (Some(entry), Some(Fingerprint::Settled(print))) = (known, &fingerprint) {
            if entry.fingerprint == *print {
                if let Ok(digest) = LayerDigest::parse(&entry.digest) {
                    entry.used_at = epoch_secs(now);
                    return Ok((digest, false));
                }
            }
        }
        let digest = layer_digest(dir)?;
        match fingerprint {
            Some(Fingerprint::Settled(print)) => {
                let entry = Entry {
                    fingerprint: print,
                    digest: digest.to_string(),
                    used_at: epoch_secs(now),
                };
                self.file.layers.insert(dir.to_owned(), entry);
                self.evict();
            }
            _ => {
                self.file.layers.remove(dir);
            }
        }
        Ok((digest, true))
    }

    /// Writes the cache back, merged with what other `migrate` processes
    /// (a drain runs several) saved since it was loaded, under a lock so
    /// that no two writers interleave.
    pub fn save(&mut self) -> Result<(), CacheError> {
        let lock_path = self.path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| CacheError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        let _held =
            Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, errno)| CacheError::Lock {
                path: lock_path,
                source: errno.into(),
            })?;
        let saved: CacheFile = read_bounded(&self.path)
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        for (path, entry) in saved.layers {
            match self.file.layers.get(&path) {
                Some(ours) if ours.used_at >= entry.used_at => {}
                _ => {
                    self.file.layers.insert(path, entry);
                }
            }
        }
        self.evict();
        Ok(record::store(&self.path, &self.file)?)
    }

    fn evict(&mut self) {
        while self.file.layers.len() > MAX_ENTRIES {
            let oldest = self
                .file
                .layers
                .iter()
                .min_by_key(|(_, e)| e.used_at)
                .map(|(p, _)| p.clone());
            match oldest {
                Some(path) => self.file.layers.remove(&path),
                None => break,
            };
        }
    }
}

fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_CACHE_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (bytes.len() as u64 <= MAX_CACHE_BYTES).then_some(bytes)
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A tree's fingerprint, or that it changed too recently to be trusted.
#[derive(Debug, PartialEq, Eq)]
pub enum Fingerprint {
    Settled(String),
    Racy,
}

/// The stat walk of the tree at `dir`, taken at `now`.
pub fn fingerprint(dir: &Path, now: SystemTime) -> std::io::Result<Fingerprint> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"migrate layer fingerprint v1\0");
    let mut newest = 0i128;
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let abs = dir.join(&rel);
        let meta = std::fs::symlink_metadata(&abs)?;
        let rel_bytes = rel.as_os_str().as_bytes();
        hasher.update(&(rel_bytes.len() as u64).to_le_bytes());
        hasher.update(rel_bytes);
        for value in [
            u64::from(meta.mode()),
            u64::from(meta.uid()),
            u64::from(meta.gid()),
            meta.size(),
            meta.ino(),
            meta.dev(),
            meta.rdev(),
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
            meta.ctime() as u64,
            meta.ctime_nsec() as u64,
        ] {
            hasher.update(&value.to_le_bytes());
        }
        for (secs, nsec) in [
            (meta.mtime(), meta.mtime_nsec()),
            (meta.ctime(), meta.ctime_nsec()),
        ] {
            newest = newest.max(i128::from(secs) * 1_000_000_000 + i128::from(nsec));
        }
        if meta.is_dir() {
            let mut names = std::fs::read_dir(&abs)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<Vec<_>>>()?;
            // Reversed, so the stack pops them in name order.
            names.sort_by(|a, b| b.cmp(a));
            pending.extend(names.into_iter().map(|n| rel.join(n)));
        }
    }
    let settled_before = now
        .checked_sub(RACY_WINDOW)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
    Ok(if newest >= settled_before {
        Fingerprint::Racy
    } else {
        Fingerprint::Settled(hasher.finalize().to_hex().to_string())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A layer whose every timestamp is an hour old.
    fn old_layer(root: &Path) {
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/sh"), b"#!").unwrap();
        std::fs::write(root.join("etc"), b"x").unwrap();
        age(root);
    }

    fn age(root: &Path) {
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        let times = std::fs::FileTimes::new()
            .set_modified(hour_ago)
            .set_accessed(hour_ago);
        for p in ["bin/sh", "etc", "bin", ""] {
            std::fs::File::open(root.join(p))
                .unwrap()
                .set_times(times)
                .unwrap();
        }
    }

    /// ctime cannot be set back: a walk "in the future" sees it settled.
    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(10)
    }

    #[test]
    fn a_fresh_tree_is_racy_and_a_settled_one_has_a_stable_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        old_layer(dir.path());
        assert_eq!(
            fingerprint(dir.path(), SystemTime::now()).unwrap(),
            Fingerprint::Racy
        );
        let first = fingerprint(dir.path(), later()).unwrap();
        assert!(matches!(first, Fingerprint::Settled(_)));
        assert_eq!(fingerprint(dir.path(), later()).unwrap(), first);
        std::fs::write(dir.path().join("etc"), b"y").unwrap();
        age(dir.path());
        assert_ne!(fingerprint(dir.path(), later()).unwrap(), first);
    }

    #[test]
    fn a_second_lookup_of_a_settled_layer_does_not_hash_it() {
        let state = tempfile::tempdir().unwrap();
        let layer = tempfile::tempdir().unwrap();
        old_layer(layer.path());
        // Wait out the ctime of the files just written.
        std::thread::sleep(RACY_WINDOW + Duration::from_millis(200));
        let mut cache = DigestCache::load(state.path());
        let (digest, hashed) = cache.digest(layer.path()).unwrap();
        assert!(hashed);
        cache.save().unwrap();
        let mut again = DigestCache::load(state.path());
        assert_eq!(again.digest(layer.path()).unwrap(), (digest.clone(), false));
        // A change is seen: its ctime is new, so the layer is hashed again.
        std::fs::write(layer.path().join("etc"), b"changed").unwrap();
        let (changed, hashed) = again.digest(layer.path()).unwrap();
        assert!(hashed);
        assert_ne!(changed, digest);
    }

    #[test]
    fn concurrent_savers_keep_each_others_entries() {
        let state = tempfile::tempdir().unwrap();
        let entry = |used_at| Entry {
            fingerprint: "f".into(),
            digest: "d".into(),
            used_at,
        };
        let mut first = DigestCache::load(state.path());
        let mut second = DigestCache::load(state.path());
        first.file.layers.insert("/l/a".into(), entry(5));
        first.save().unwrap();
        second.file.layers.insert("/l/b".into(), entry(6));
        second.save().unwrap();
        let merged = DigestCache::load(state.path());
        assert_eq!(merged.file.layers.len(), 2);
    }

    #[test]
    fn an_oversized_or_broken_cache_is_ignored() {
        let state = tempfile::tempdir().unwrap();
        let path = state.path().join("layer-digests.json");
        std::fs::write(&path, b"{\"layers\": {\"/x\": ").unwrap();
        assert!(DigestCache::load(state.path()).file.layers.is_empty());
        let big = format!(
            "{{\"layers\": {{}}, \"pad\": \"{}\"}}",
            "a".repeat(MAX_CACHE_BYTES as usize)
        );
        std::fs::write(&path, big).unwrap();
        assert!(read_bounded(&path).is_none());
        assert!(DigestCache::load(state.path()).file.layers.is_empty());
    }

    #[test]
    fn the_least_recently_used_entries_go_first() {
        let state = tempfile::tempdir().unwrap();
        let mut cache = DigestCache::load(state.path());
        for i in 0..=MAX_ENTRIES as u64 {
            cache.file.layers.insert(
                PathBuf::from(format!("/l/{i}")),
                Entry {
                    fingerprint: String::new(),
                    digest: String::new(),
                    used_at: 1000 + i,
                },
            );
        }
        cache.evict();
        assert_eq!(cache.file.layers.len(), MAX_ENTRIES);
        assert!(!cache.file.layers.contains_key(Path::new("/l/0")));
        assert!(cache.file.layers.contains_key(Path::new("/l/1")));
    }
}
