//! The layer store: lower layers by content digest under `<state>/layers`,
//! shared by every container restored here, so each is received once.
//!
//! Beside the store, not in it (the store holds layers and layers in
//! transit only): `layers.lock`, taken shared by a preflight from the
//! moment it finds a layer here until the claimed container dir names it,
//! and exclusively by a garbage collection ([`crate::gc`] says why);
//! `layers.used/<digest>`, whose mtime is when a migration last used the
//! layer.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use migrate_common::rootfs::digest::{layer_digest, LayerDigest};
use nix::fcntl::{Flock, FlockArg};

/// Prefixes of the store's own entries that are not (or no longer) layers.
const INCOMING: &str = ".incoming-";
const REMOVING: &str = ".removing-";

#[derive(Debug)]
pub struct LayerStore {
    root: PathBuf,
    next_incoming: AtomicU64,
}

impl LayerStore {
    pub fn open(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating layer store {}", root.display()))?;
        Ok(Self {
            root,
            next_incoming: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes layers whose transfer was interrupted, and those a garbage
    /// collection took out of the store but did not finish removing.
    pub fn remove_incomplete(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.root)
            .with_context(|| format!("listing {}", self.root.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(INCOMING) || name.starts_with(REMOVING) {
                discard(&entry.path());
            }
        }
        Ok(())
    }

    /// The layers in the store.
    pub fn list(&self) -> Result<Vec<LayerDigest>> {
        let mut layers = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .with_context(|| format!("listing {}", self.root.display()))?
        {
            let entry = entry?;
            let Ok(digest) = LayerDigest::parse(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                layers.push(digest);
            }
        }
        layers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(layers)
    }

    /// The store's lock, shared: layers found here stay until it is
    /// released.
    pub fn lock_shared(&self) -> Result<Flock<File>> {
        self.lock(FlockArg::LockShared)
    }

    /// The store's lock, exclusive: no preflight is between finding a
    /// layer and recording its use.
    pub fn lock_exclusive(&self) -> Result<Flock<File>> {
        self.lock(FlockArg::LockExclusive)
    }

    fn lock(&self, how: FlockArg) -> Result<Flock<File>> {
        let path = self.root.with_extension("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Flock::lock(file, how)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("locking {}", path.display()))
    }

    fn used_dir(&self) -> PathBuf {
        self.root.with_extension("used")
    }

    fn used_marker(&self, digest: &LayerDigest) -> PathBuf {
        self.used_dir().join(digest.as_str())
    }

    /// Records that a migration uses the layer now.
    pub fn touch(&self, digest: &LayerDigest) -> Result<()> {
        let marker = self.used_marker(digest);
        let dir = self.used_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        File::create(&marker)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .with_context(|| format!("touching {}", marker.display()))
    }

    /// When a migration last used the layer; for one never recorded, when
    /// it arrived.
    pub fn last_used(&self, digest: &LayerDigest) -> Result<SystemTime> {
        std::fs::metadata(self.used_marker(digest))
            .or_else(|_| std::fs::metadata(self.path(digest)))
            .and_then(|m| m.modified())
            .with_context(|| format!("reading when layer {digest} was last used"))
    }

    /// Takes the layer out of the store under a name no lookup matches;
    /// the caller removes the returned directory (outside the lock: that
    /// can take a while).
    pub fn take_out(&self, digest: &LayerDigest) -> Result<PathBuf> {
        let n = self.next_incoming.fetch_add(1, Ordering::Relaxed);
        let aside = self.root.join(format!(
            "{REMOVING}{}-{}-{n}",
            digest.as_str(),
            std::process::id()
        ));
        let path = self.path(digest);
        std::fs::rename(&path, &aside)
            .with_context(|| format!("moving {} to {}", path.display(), aside.display()))?;
        let _ = std::fs::remove_file(self.used_marker(digest));
        Ok(aside)
    }

    pub fn path(&self, digest: &LayerDigest) -> PathBuf {
        self.root.join(digest.as_str())
    }

    pub fn has(&self, digest: &LayerDigest) -> bool {
        self.path(digest).is_dir()
    }

    /// A fresh directory to unpack an incoming layer into; it only becomes
    /// part of the store through [`LayerStore::commit`].
    pub fn incoming_dir(&self, digest: &LayerDigest) -> Result<PathBuf> {
        let n = self.next_incoming.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(format!(
            "{INCOMING}{}-{}-{n}",
            digest.as_str(),
            std::process::id()
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Verifies that `incoming` holds exactly the layer named `digest`, then
    /// moves it into the store. On mismatch the directory is removed.
    pub fn commit(&self, incoming: &Path, digest: &LayerDigest) -> Result<()> {
        let actual =
            layer_digest(incoming).with_context(|| format!("hashing {}", incoming.display()))?;
        if &actual != digest {
            discard(incoming);
            bail!("received layer hashes to {actual}, not {digest}");
        }
        let target = self.path(digest);
        if target.exists() {
            // Another migration brought the same layer meanwhile.
            discard(incoming);
            return Ok(());
        }
        std::fs::rename(incoming, &target)
            .with_context(|| format!("moving {} to {}", incoming.display(), target.display()))
    }
}

pub fn discard(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove");
    }
}
