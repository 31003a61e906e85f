//! The scratch directories archives are unpacked into, and what must hold after each unpack.

#![allow(clippy::unwrap_used)]

use super::*;

/// `root/dest` is where archives are unpacked; beside it, `root/outside` (a file and a
/// directory) and `root/sibling` must come out untouched. The base a delta applies to
/// holds symlinks to all of them, and a hard link pair.
pub(crate) struct Scratch {
    pub(crate) root: tempfile::TempDir,
    pub(crate) before: BTreeMap<PathBuf, Identity>,
}

/// What must not change about an entry outside the destination.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) mode: u32,
    pub(crate) owner: (u32, u32),
    pub(crate) ino: u64,
    pub(crate) nlink: u64,
    pub(crate) size: u64,
    pub(crate) mtime: (i64, i64),
    pub(crate) ctime: (i64, i64),
    pub(crate) content: Vec<u8>,
    pub(crate) xattrs: Vec<std::ffi::OsString>,
}

pub(crate) fn identity(path: &Path) -> Identity {
    let meta = fs::symlink_metadata(path).unwrap();
    let content = if meta.is_file() {
        fs::read(path).unwrap()
    } else if meta.file_type().is_symlink() {
        fs::read_link(path).unwrap().into_os_string().into_vec()
    } else {
        Vec::new()
    };
    let mut xattrs: Vec<_> = xattr::list(path).map(|l| l.collect()).unwrap_or_default();
    xattrs.sort();
    Identity {
        mode: meta.mode(),
        owner: (meta.uid(), meta.gid()),
        ino: meta.ino(),
        nlink: meta.nlink(),
        size: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
        content,
        xattrs,
    }
}

impl Scratch {
    pub(crate) fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"untouched").unwrap();
        fs::create_dir(outside.join("vdir")).unwrap();
        fs::write(root.path().join("sibling"), b"untouched").unwrap();
        fs::create_dir(root.path().join("dest")).unwrap();
        let mut scratch = Self {
            root,
            before: BTreeMap::new(),
        };
        scratch.before = scratch.outside_state();
        scratch
    }

    pub(crate) fn dest(&self) -> PathBuf {
        self.root.path().join("dest")
    }

    pub(crate) fn outside(&self) -> PathBuf {
        self.root.path().join("outside")
    }

    pub(crate) fn outside_bytes(&self) -> Vec<u8> {
        self.outside().into_os_string().into_vec()
    }

    /// Everything in the scratch dir but the destination; the root's own times change when
    /// the destination is made anew, so they are left out.
    pub(crate) fn outside_state(&self) -> BTreeMap<PathBuf, Identity> {
        let mut state = BTreeMap::new();
        let mut root = identity(self.root.path());
        (root.mtime, root.ctime, root.nlink) = ((0, 0), (0, 0), 0);
        state.insert(PathBuf::new(), root);
        let mut stack = vec![self.root.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path == self.dest() {
                    continue;
                }
                let id = identity(&path);
                if fs::symlink_metadata(&path).unwrap().is_dir() {
                    stack.push(path.clone());
                }
                let rel = path.strip_prefix(self.root.path()).unwrap().to_path_buf();
                state.insert(rel, id);
            }
        }
        state
    }

    /// A fresh destination: empty, or the base of a delta.
    pub(crate) fn reset(&self, base: bool) {
        let dest = self.dest();
        make_removable(&dest);
        fs::remove_dir_all(&dest).unwrap();
        fs::create_dir(&dest).unwrap();
        if base {
            make_base(&dest, Some(&self.outside()));
        }
    }

    /// What changed outside the destination, if anything.
    pub(crate) fn escaped(&self) -> Option<String> {
        let now = self.outside_state();
        if now == self.before {
            return None;
        }
        let mut changes = Vec::new();
        for (path, id) in &now {
            match self.before.get(path) {
                None => changes.push(format!("{} appeared", path.display())),
                Some(old) if old != id => {
                    changes.push(format!("{} changed: {old:?} became {id:?}", path.display()))
                }
                _ => {}
            }
        }
        for path in self.before.keys().filter(|p| !now.contains_key(*p)) {
            changes.push(format!("{} went", path.display()));
        }
        Some(changes.join("; "))
    }
}

/// The base a delta applies to: a small tree, symlinks out of it (relative; and absolute to
/// `outside`, when given) and a hard link pair.
pub(crate) fn make_base(dest: &Path, outside: Option<&Path>) {
    fs::create_dir(dest.join("dir")).unwrap();
    fs::write(dest.join("dir/file"), b"base").unwrap();
    fs::write(dest.join("file"), b"base").unwrap();
    fs::hard_link(dest.join("file"), dest.join("hard")).unwrap();
    symlink("../outside", dest.join("link-out")).unwrap();
    symlink("../outside/victim", dest.join("link-victim")).unwrap();
    symlink("../outside/vdir", dest.join("link-vdir")).unwrap();
    symlink("../sibling", dest.join("link-sibling")).unwrap();
    if let Some(outside) = outside {
        symlink(outside, dest.join("link-abs")).unwrap();
    }
}

/// What [`make_base`] puts in the destination's top directory, its absolute symlink included.
pub(crate) const BASE_ENTRIES: usize = 8;

/// Gives every directory under `dir` an owner-writable mode, so that what an archive made
/// read-only can be removed.
pub(crate) fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if meta.is_dir() {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                make_removable(&entry.path());
            }
        }
    }
}

/// Under the default policy: no device node but 0:0 character devices, no setuid or setgid
/// bit on anything but a directory, no xattr that grants privileges.
pub(crate) fn privileges_in(dest: &Path) -> Option<String> {
    let mut stack = vec![dest.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let kind = meta.file_type();
            if kind.is_block_device() || (kind.is_char_device() && meta.rdev() != 0) {
                return Some(format!(
                    "{} is a device node ({:#x})",
                    path.display(),
                    meta.rdev()
                ));
            }
            if !kind.is_dir() && !kind.is_symlink() && meta.mode() & 0o6000 != 0 {
                return Some(format!("{} has mode {:o}", path.display(), meta.mode()));
            }
            for name in xattr::list(&path).into_iter().flatten() {
                let name = name.as_bytes();
                if name == b"security.capability"
                    || (name.starts_with(b"trusted.") && !name.starts_with(b"trusted.overlay."))
                {
                    return Some(format!(
                        "{} has xattr {}",
                        path.display(),
                        String::from_utf8_lossy(name)
                    ));
                }
            }
            if kind.is_dir() {
                stack.push(path);
            }
        }
    }
    None
}

/// Most an unpack may hold at once: the largest extension the limits let through, held by
/// the guard, the crate and as decoded xattrs; the crate's buffers; and, proportional to the
/// input, what is kept of directories until the end.
pub(crate) fn unpack_bound(input_len: usize) -> usize {
    let limits = ArchiveLimits::default();
    4 * limits.pax_header as usize + 2 * limits.long_name as usize + (1 << 20) + 16 * input_len
}

/// A guard refusal that lost its type on the way out would be a `Decode` error carrying the
/// guard's message.
pub(crate) fn untyped(err: &ArchiveError) -> Option<String> {
    match err {
        ArchiveError::Decode { source, .. }
            if source.to_string().starts_with("the archive header at byte") =>
        {
            Some(format!("a guard refusal came out untyped: {err}"))
        }
        _ => None,
    }
}

// --- Inputs ----------------------------------------------------------------------------
