//! The container's root filesystem: finding its overlay mount, identifying
//! lower layers by content, and moving the upper dir as an archive, whole or as the changes
//! since an earlier one.

pub mod archive;
pub mod delta;
pub mod digest;
pub mod mountinfo;
pub mod overlay;
pub mod snapshot;

pub use digest::LayerDigest;
pub use overlay::OverlayMount;

use std::path::Path;

/// The uncompressed bytes sending `dir` takes: the length of its archive
/// ([`archive::measure_dir`]), content, metadata and padding included. What
/// the source announces for its layers and upper dir: the destination checks
/// its disk space against it and holds each layer's stream to it.
pub fn tree_size(dir: &Path) -> Result<u64, archive::ArchiveError> {
    archive::measure_dir(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn tree_size_is_the_length_of_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), [0u8; 1000]).unwrap();
        std::fs::write(dir.path().join("g"), [0u8; 24]).unwrap();
        std::os::unix::fs::symlink("a/b/f", dir.path().join("link")).unwrap();
        let (archive, _) = super::archive::pack_dir(dir.path(), Vec::new()).unwrap();
        let size = super::tree_size(dir.path()).unwrap();
        assert_eq!(size, archive.len() as u64);
        assert!(size > 1024);
    }
}
