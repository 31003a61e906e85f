//! What an archive from the wire may create on the destination host.
//!
//! Everything unpacked lands on the destination's own filesystem before any container
//! isolation applies: a device node there opens the device for whoever can reach it, a
//! setuid file runs as its owner for whoever can run it, and `security.capability` grants
//! capabilities the same way. So by default an archive may hold regular files, directories,
//! symlinks, hard links, FIFOs and overlayfs whiteouts (0:0 character devices), with the
//! xattrs overlayfs and users set, and nothing that grants privileges; a destination that
//! trusts its sources with them says so ([`UnpackPolicy::privileged`]).
//!
//! Lower layers get the same policy as the upper dir. Their digest proves only that the
//! layer is the one the source claimed, and the source is the peer the policy guards
//! against; the layer store is shared by every later container that names the same digest.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tar::EntryType;

use super::limits::ArchiveLimits;
use super::ArchiveError;

/// How much an unpacked archive is trusted, and what it may make the unpacker hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackPolicy {
    /// Device nodes other than whiteouts, setuid and setgid bits on anything but a directory,
    /// `security.capability` and `trusted.*` xattrs other than `trusted.overlay.*`.
    pub allow_privileged: bool,
    pub limits: ArchiveLimits,
}

impl UnpackPolicy {
    /// Nothing that grants privileges; the default.
    pub fn strict() -> Self {
        Self::default()
    }

    /// Everything a container's rootfs can hold.
    pub fn privileged() -> Self {
        Self {
            allow_privileged: true,
            ..Self::default()
        }
    }

    /// Refuses an entry of `kind` (device number `dev` for nodes) with `mode` and xattr
    /// names `xattrs` that only a privileged migration may bring.
    pub(super) fn check<'a>(
        &self,
        rel: &Path,
        kind: EntryType,
        dev: Option<(u64, u64)>,
        mode: u32,
        xattrs: impl IntoIterator<Item = &'a OsStr>,
    ) -> Result<(), ArchiveError> {
        if self.allow_privileged {
            return Ok(());
        }
        let refuse = |what| {
            Err(ArchiveError::Privileged {
                path: rel.to_path_buf(),
                what,
            })
        };
        match kind {
            EntryType::Char if dev == Some((0, 0)) => {}
            EntryType::Char | EntryType::Block => {
                return refuse("a device node other than an overlayfs whiteout")
            }
            _ => {}
        }
        let has_mode = !matches!(
            kind,
            EntryType::Directory | EntryType::Symlink | EntryType::Link
        );
        if has_mode && mode & 0o6000 != 0 {
            return refuse("a setuid or setgid bit");
        }
        for name in xattrs {
            let name = name.as_bytes();
            if name == b"security.capability" {
                return refuse("file capabilities (security.capability)");
            }
            if name.starts_with(b"trusted.") && !name.starts_with(b"trusted.overlay.") {
                return refuse("a trusted.* xattr that is not overlayfs's");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(
        policy: &UnpackPolicy,
        kind: EntryType,
        dev: (u64, u64),
        mode: u32,
        xattr: &str,
    ) -> bool {
        let xattrs = [OsStr::new(xattr)].into_iter().filter(|x| !x.is_empty());
        policy
            .check(Path::new("e"), kind, Some(dev), mode, xattrs)
            .is_ok()
    }

    #[test]
    fn strict_refuses_what_grants_privileges_and_privileged_takes_it() {
        let (strict, privileged) = (UnpackPolicy::strict(), UnpackPolicy::privileged());
        let allowed = [
            (EntryType::Char, (0, 0), 0o644, ""),
            (EntryType::Regular, (0, 0), 0o1777, "trusted.overlay.origin"),
            (EntryType::Directory, (0, 0), 0o2775, "user.x"),
            (EntryType::Fifo, (0, 0), 0o600, "security.selinux"),
        ];
        let refused = [
            (EntryType::Char, (1, 3), 0o666, ""),
            (EntryType::Block, (0, 0), 0o600, ""),
            (EntryType::Regular, (0, 0), 0o4755, ""),
            (EntryType::Regular, (0, 0), 0o2755, ""),
            (EntryType::Regular, (0, 0), 0o755, "security.capability"),
            (EntryType::Directory, (0, 0), 0o755, "trusted.evil"),
        ];
        for (kind, dev, mode, xattr) in allowed {
            assert!(
                verdict(&strict, kind, dev, mode, xattr),
                "{kind:?} {mode:o} {xattr}"
            );
        }
        for (kind, dev, mode, xattr) in refused {
            assert!(
                !verdict(&strict, kind, dev, mode, xattr),
                "{kind:?} {mode:o} {xattr}"
            );
            assert!(verdict(&privileged, kind, dev, mode, xattr));
        }
    }
}
