//! The layer store: lower layers by content digest under `<state>/layers`,
//! shared by every container restored here, so each is received once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use migrate_common::rootfs::digest::{layer_digest, LayerDigest};

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

    /// Removes layers whose transfer was interrupted.
    pub fn remove_incomplete(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.root)
            .with_context(|| format!("listing {}", self.root.display()))?
        {
            let entry = entry?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(".incoming-")
            {
                discard(&entry.path());
            }
        }
        Ok(())
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
            ".incoming-{}-{}-{n}",
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
