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

/// Bytes of regular-file content under `dir` (apparent sizes, no symlinks
/// followed): what archiving the tree will read.
pub fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn tree_size_counts_nested_files_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), [0u8; 1000]).unwrap();
        std::fs::write(dir.path().join("g"), [0u8; 24]).unwrap();
        std::os::unix::fs::symlink("a/b/f", dir.path().join("link")).unwrap();
        assert_eq!(super::tree_size(dir.path()).unwrap(), 1024);
    }
}
