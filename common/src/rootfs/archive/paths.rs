//! Keeping every path an archive names inside the destination: no absolute paths, no `..`,
//! and nothing reached through a symlink.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::ArchiveError;

/// The entry's path split into its components, or `None` if it is absolute or has a `..`
/// component. Empty and `.` components are dropped, so the root comes back empty.
pub(super) fn safe_components(raw: &[u8]) -> Option<Vec<&OsStr>> {
    if raw.starts_with(b"/") {
        return None;
    }
    let mut components = Vec::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return None,
            name => components.push(OsStr::from_bytes(name)),
        }
    }
    Some(components)
}

/// `dest` joined with `parents`, each checked to be a real directory, or `None` if one is
/// missing.
pub(super) fn existing_parent(
    dest: &Path,
    parents: &[&OsStr],
    rel: &Path,
) -> Result<Option<PathBuf>, ArchiveError> {
    let mut path = dest.to_path_buf();
    for component in parents {
        path.push(component);
        if !is_real_dir(&path, rel)? {
            return Ok(None);
        }
    }
    Ok(Some(path))
}

/// Whether `path`, on the way to the entry `rel`, is a directory (`true`) or missing
/// (`false`). Anything else, a symlink above all, would let the entry land outside the
/// destination.
pub(super) fn is_real_dir(path: &Path, rel: &Path) -> Result<bool, ArchiveError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(true),
        Ok(meta) if meta.file_type().is_symlink() => Err(ArchiveError::UnsafePath {
            path: rel.to_path_buf(),
        }),
        Ok(_) => Err(ArchiveError::Create {
            path: path.to_path_buf(),
            source: Errno::ENOTDIR.into(),
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ArchiveError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_absolute_and_parent_paths() {
        let parts = |raw: &[u8]| {
            safe_components(raw)
                .map(|c| c.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>())
        };
        assert_eq!(
            parts(b"./a//b/./c/"),
            Some(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
        );
        assert_eq!(parts(b"./"), Some(vec![]));
        assert_eq!(parts(b""), Some(vec![]));
        assert_eq!(
            parts(b"a/..b/c.."),
            Some(vec![b"a".to_vec(), b"..b".to_vec(), b"c..".to_vec()])
        );
        for refused in [&b"/etc/passwd"[..], b"..", b"a/../b", b"a/.."] {
            assert_eq!(parts(refused), None, "{}", String::from_utf8_lossy(refused));
        }
    }
}
