//! Mounting and unmounting, through the mount(2) family directly (no `mount`
//! binary): overlay rootfs on the destination, and cleanup of whatever a
//! failed restore left mounted.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::rootfs::mountinfo::{self, MountInfoError};

/// mount(2) takes the option string as one page.
const MAX_MOUNT_DATA: usize = 4095;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting overlay at {target} ({options})")]
    Overlay {
        target: PathBuf,
        options: String,
        #[source]
        source: nix::Error,
    },
    #[error("overlay options for {target} are {len} bytes, over the kernel's {MAX_MOUNT_DATA}-byte limit")]
    OptionsTooLong { target: PathBuf, len: usize },
    #[error("unmounting {target}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    MountInfo(#[from] MountInfoError),
}

/// The option string for an overlay of `lowers` (uppermost first), escaping
/// the characters overlayfs treats as separators.
pub fn overlay_options(lowers: &[PathBuf], upper: &Path, work: &Path) -> String {
    let esc = |p: &Path| {
        p.to_string_lossy()
            .replace('\\', "\\\\")
            .replace(':', "\\:")
            .replace(',', "\\,")
    };
    let lower = lowers.iter().map(|p| esc(p)).collect::<Vec<_>>().join(":");
    format!(
        "lowerdir={lower},upperdir={},workdir={}",
        esc(upper),
        esc(work)
    )
}

pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), MountError> {
    let options = overlay_options(lowers, upper, work);
    if options.len() > MAX_MOUNT_DATA {
        return Err(MountError::OptionsTooLong {
            target: target.to_owned(),
            len: options.len(),
        });
    }
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|source| MountError::Overlay {
        target: target.to_owned(),
        options,
        source,
    })
}

/// Unmounts `target`; a busy mount is detached instead so it disappears once
/// its last user is gone.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::Error::EBUSY) => {
            umount2(target, MntFlags::MNT_DETACH).map_err(|source| MountError::Unmount {
                target: target.to_owned(),
                source,
            })
        }
        Err(source) => Err(MountError::Unmount {
            target: target.to_owned(),
            source,
        }),
    }
}

/// Unmounts every mount at or below `dir`, deepest first; returns what it
/// unmounted.
pub fn unmount_all_under(dir: &Path) -> Result<Vec<PathBuf>, MountError> {
    let entries = mountinfo::read_own()?;
    let mut done = Vec::new();
    for entry in mountinfo::mounts_under(&entries, dir) {
        match unmount(&entry.mount_point) {
            Ok(()) => done.push(entry.mount_point.clone()),
            // Already gone with a parent that was detached.
            Err(MountError::Unmount {
                source: nix::Error::EINVAL | nix::Error::ENOENT,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_escape_separators() {
        let opts = overlay_options(
            &[PathBuf::from("/s/layers/a:b"), PathBuf::from("/s/layers/c")],
            Path::new("/s/c1/up,per"),
            Path::new("/s/c1/work"),
        );
        assert_eq!(
            opts,
            "lowerdir=/s/layers/a\\:b:/s/layers/c,upperdir=/s/c1/up\\,per,workdir=/s/c1/work"
        );
    }
}
