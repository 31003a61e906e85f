//! Where received CRIU images live: `--image-dir`, a tmpfs (default
//! `/dev/shm/migrate-dst`), one dir per container being received
//! (`<image-dir>/<container id>`), which `<state>/containers/<id>/images`
//! links to. `runc restore` then reads memory from memory, not back from a
//! disk it was just written to.
//!
//! Images are not made durable: they are needed only until the restore
//! ends, and a host that crashes mid-migration leaves the source with its
//! own copy. What must survive a crash (layers, the upper dir) stays under
//! the state dir, on disk. Every way a migration ends removes its images
//! ([`ImageDir::remove`]); at start, those no held copy needs go
//! ([`ImageDir::remove_orphans`]).

use std::collections::HashSet;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::statfs::{self, FsType};

/// The `--image-dir` default: a tmpfs on every systemd host.
pub const DEFAULT_IMAGE_DIR: &str = "/dev/shm/migrate-dst";

#[derive(Debug, thiserror::Error)]
pub enum ImageDirError {
    #[error(
        "--image-dir {dir} is on {found}, not a tmpfs: images are held in memory on the \
         destination (mount a tmpfs there, or point --image-dir at one, such as /dev/shm/...)"
    )]
    NotTmpfs { dir: PathBuf, found: String },
    #[error("{context} {path}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the filesystem of {path}")]
    Statfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// The daemon's image dir, checked to be a tmpfs.
#[derive(Debug, Clone)]
pub struct ImageDir {
    root: PathBuf,
}

impl ImageDir {
    /// Creates `root` (mode 0700: images hold containers' memory) unless it
    /// exists, makes it 0700 if it does, and refuses it unless it is on a
    /// tmpfs.
    pub fn open(root: &Path) -> Result<Self, ImageDirError> {
        let io = |context, source| ImageDirError::Io {
            context,
            path: root.to_owned(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| io("creating", e))?;
        let found = statfs::statfs(root)
            .map_err(|source| ImageDirError::Statfs {
                path: root.to_owned(),
                source,
            })?
            .filesystem_type();
        require_tmpfs(root, found)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("making private", e))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the images of container `id` go.
    pub fn of(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Free bytes on the image dir's tmpfs (what its `size=` leaves).
    pub fn free_bytes(&self) -> nix::Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.root)?;
        Ok(st.blocks_available().saturating_mul(st.fragment_size()))
    }

    /// Removes container `id`'s images, if any are left.
    pub fn remove(&self, id: &str) {
        let dir = self.of(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "removing {}", dir.display()),
        }
    }

    /// At start: removes the images of every container but those in `keep`
    /// (held copies whose restore may still run), left by a daemon that
    /// stopped mid-migration. Returns the ids removed.
    pub fn remove_orphans(&self, keep: &HashSet<String>) -> Result<Vec<String>, ImageDirError> {
        let entries = std::fs::read_dir(&self.root).map_err(|source| ImageDirError::Io {
            context: "listing",
            path: self.root.clone(),
            source,
        })?;
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&id) {
                self.remove(&id);
                removed.push(id);
            }
        }
        Ok(removed)
    }
}

/// Accepts only a tmpfs; the refusal names the dir and what it is on.
fn require_tmpfs(dir: &Path, found: FsType) -> Result<(), ImageDirError> {
    if found == statfs::TMPFS_MAGIC {
        return Ok(());
    }
    Err(ImageDirError::NotTmpfs {
        dir: dir.to_owned(),
        found: filesystem_name(found),
    })
}

/// The name of the filesystems an image dir is likely to be put on by
/// mistake; others by their magic number.
fn filesystem_name(found: FsType) -> String {
    let known = [
        (statfs::EXT4_SUPER_MAGIC, "ext4"),
        (statfs::XFS_SUPER_MAGIC, "xfs"),
        (statfs::BTRFS_SUPER_MAGIC, "btrfs"),
        (statfs::OVERLAYFS_SUPER_MAGIC, "overlayfs"),
        (statfs::NFS_SUPER_MAGIC, "nfs"),
        (statfs::FUSE_SUPER_MAGIC, "fuse"),
        (statfs::F2FS_SUPER_MAGIC, "f2fs"),
        (statfs::HUGETLBFS_MAGIC, "hugetlbfs"),
    ];
    known.iter().find(|(magic, _)| *magic == found).map_or_else(
        || format!("a filesystem of magic {:#x}", found.0),
        |(_, name)| (*name).to_owned(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_tmpfs_is_accepted() {
        let dir = Path::new("/var/lib/migrate-dst/images");
        assert!(require_tmpfs(dir, statfs::TMPFS_MAGIC).is_ok());
        let refused = require_tmpfs(dir, statfs::EXT4_SUPER_MAGIC)
            .unwrap_err()
            .to_string();
        assert!(
            refused.starts_with("--image-dir /var/lib/migrate-dst/images is on ext4, not a tmpfs"),
            "{refused}"
        );
        let odd = require_tmpfs(dir, FsType(0x1234)).unwrap_err().to_string();
        assert!(odd.contains("a filesystem of magic 0x1234"), "{odd}");
    }

    #[test]
    fn orphans_go_and_kept_ones_stay() {
        // Wherever the test's temp dir is, the listing logic is the same:
        // only the tmpfs check needs a tmpfs.
        let tmp = tempfile::tempdir().unwrap();
        let images = ImageDir {
            root: tmp.path().to_owned(),
        };
        for id in ["held", "left"] {
            std::fs::create_dir_all(images.of(id).join("final")).unwrap();
            std::fs::write(images.of(id).join("final/pages-1.img"), b"x").unwrap();
        }
        let keep = HashSet::from(["held".to_owned()]);
        assert_eq!(images.remove_orphans(&keep).unwrap(), vec!["left"]);
        assert!(images.of("held").join("final/pages-1.img").exists());
        assert!(!images.of("left").exists());
        images.remove("held");
        images.remove("never-there");
        assert!(!images.of("held").exists());
    }
}
