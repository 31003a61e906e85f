//! Recreating a tree from an archive, or applying a delta onto a copy of its base.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{self, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid};
use tar::{Entry, EntryType};

use super::limits::Guarded;
use super::paths::{existing_parent, is_real_dir, safe_components};
use super::{xattrs, ArchiveError, UnpackPolicy, REMOVE_KEY, REMOVE_VALUE};

/// Recreates a tree packed by [`super::pack_dir`] under `dest` (which exists and is empty),
/// exactly.
///
/// Entries are created without ever following a symlink: parents must be real directories
/// (missing ones are made with a plain `mkdir`), files are created with `O_EXCL`, and an
/// entry that already exists is an error rather than being replaced. Paths that are absolute,
/// contain `..`, or lead through a symlink are refused with [`ArchiveError::UnsafePath`].
/// Directory owners, modes, xattrs and mtimes, including those of `dest` itself, are applied
/// after all entries exist. The stream is read up to its end-of-archive marker, not to EOF.
/// Removal entries (see the [module docs](super)) are refused: only a delta has them.
///
/// `policy` says what the archive may create (see [`UnpackPolicy`]) and how much of it may
/// be held in memory: long names, PAX headers and sparse maps are checked against its limits
/// before they are read.
pub fn unpack_dir<R: Read>(
    input: R,
    dest: &Path,
    policy: &UnpackPolicy,
) -> Result<(), ArchiveError> {
    Unpacker::new(dest, Onto::Empty, policy).run(input)
}

/// Applies a delta made by [`super::pack_delta`] onto `dest`, which holds what its base
/// archive unpacked to, so that `dest` ends up equal to the tree the delta was packed from.
///
/// The same path checks as [`unpack_dir`] guard every entry, removals included, and neither
/// a removal nor an entry may name `dest` itself (only its own directory entry, `./`, may).
/// Onto the existing tree:
///
/// * a removal deletes the entry and, for a directory, everything below it; an entry that
///   is already gone is fine;
/// * a directory entry keeps an existing directory and what is below it, and replaces
///   anything else;
/// * every other entry replaces whatever has its name, a directory with its subtree
///   included, with a new inode, so that names hard-linked to the old one keep the old
///   content until the delta relinks them;
/// * each entry's xattrs become exactly the archive's, removing those it does not list (an
///   existing directory may hold xattrs the source has since removed, and a new entry may
///   inherit a default ACL from an existing parent);
/// * directories the delta has no entry for keep their mtime although entries below them
///   were replaced;
/// * a directory entry whose path, or a parent's, a later entry replaces is refused
///   ([`ArchiveError::UnsafePath`] for a symlink, [`ArchiveError::Malformed`] otherwise):
///   its metadata, applied last, would land on what took its place.
///
/// `policy` applies as in [`unpack_dir`].
pub fn unpack_delta<R: Read>(
    input: R,
    dest: &Path,
    policy: &UnpackPolicy,
) -> Result<(), ArchiveError> {
    Unpacker::new(dest, Onto::Existing, policy).run(input)
}

/// Bytes a kept directory costs beyond its path and xattrs (the `Vec` slot, the map nodes).
const DIR_OVERHEAD: u64 = 128;
/// Bytes a touched directory's saved mtime costs beyond its path.
const TOUCHED_OVERHEAD: u64 = 64;
/// The kernel's limits on one xattr (`XATTR_NAME_MAX`, `XATTR_SIZE_MAX`): anything longer
/// could not be set, so it is refused before it is kept.
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 << 10;

/// What `dest` holds when unpacking starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Onto {
    /// Nothing: any entry that exists already is an error.
    Empty,
    /// The base of a delta: entries are replaced.
    Existing,
}

/// What the archive says about an entry besides its type, name and content.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: BTreeMap<OsString, Vec<u8>>,
    /// A removal entry's marker.
    remove: bool,
}

struct Unpacker<'a> {
    dest: &'a Path,
    onto: Onto,
    policy: &'a UnpackPolicy,
    /// Bytes held in `dirs` and `touched`, against [`ArchiveLimits::retained`].
    retained: u64,
    /// Directories the archive has entries for, in stream order.
    dirs: Vec<(PathBuf, EntryMeta)>,
    /// The mtime each directory had before this unpack first created or removed something
    /// in it.
    touched: BTreeMap<PathBuf, TimeSpec>,
}

impl<'a> Unpacker<'a> {
    fn new(dest: &'a Path, onto: Onto, policy: &'a UnpackPolicy) -> Self {
        Self {
            dest,
            onto,
            policy,
            retained: 0,
            dirs: Vec::new(),
            touched: BTreeMap::new(),
        }
    }

    fn run<R: Read>(mut self, input: R) -> Result<(), ArchiveError> {
        let (guarded, refusal) = Guarded::new(input, self.policy.limits.clone());
        let mut archive = tar::Archive::new(guarded);
        archive.set_overwrite(false);
        // The guard's typed reason, when it is what stopped the crate.
        let dest = self.dest;
        let decode_error = |source| {
            refusal
                .borrow_mut()
                .take()
                .unwrap_or_else(|| ArchiveError::Decode {
                    path: dest.to_path_buf(),
                    source,
                })
        };
        for entry in archive.entries().map_err(decode_error)? {
            self.unpack_entry(&mut entry.map_err(decode_error)?)?;
        }
        // Last, and deepest first: creating entries bumps a directory's mtime, a restrictive
        // mode could lock out what follows, and a default ACL or setgid bit would leak into
        // entries created below it.
        let sync_xattrs = self.onto == Onto::Existing;
        for (path, meta) in self.dirs.iter().rev() {
            // Onto an existing tree, a later entry may have replaced the directory, or one of
            // its parents, with a symlink or a file: its owner, mode and xattrs would then
            // land outside the destination, or give a file a directory's setuid bits.
            if self.onto == Onto::Existing {
                let rel = || path.strip_prefix(dest).unwrap_or(path).to_path_buf();
                match now_at(dest, path) {
                    Now::Dir => {}
                    Now::ThroughSymlink => return Err(ArchiveError::UnsafePath { path: rel() }),
                    Now::Replaced => {
                        return Err(ArchiveError::Malformed {
                            path: rel(),
                            reason: "a directory entry that a later entry replaces",
                        })
                    }
                }
            }
            set_metadata(path, meta, false, sync_xattrs)?;
        }
        let archived: BTreeSet<&Path> = self.dirs.iter().map(|(path, _)| path.as_path()).collect();
        for (dir, mtime) in &self.touched {
            // A directory replaced or removed since it was touched has no mtime to restore.
            let replaced = self.onto == Onto::Existing && !matches!(now_at(dest, dir), Now::Dir);
            if !archived.contains(dir.as_path()) && !replaced {
                stat::utimensat(
                    None,
                    dir,
                    &TimeSpec::UTIME_OMIT,
                    mtime,
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(|errno| metadata_error(dir, "mtime", errno))?;
            }
        }
        Ok(())
    }

    fn unpack_entry<R: Read>(&mut self, entry: &mut Entry<'_, R>) -> Result<(), ArchiveError> {
        let raw_path = entry.path_bytes().into_owned();
        let rel = PathBuf::from(OsString::from_vec(raw_path.clone()));
        let unsafe_path = || ArchiveError::UnsafePath { path: rel.clone() };
        let malformed = |reason| ArchiveError::Malformed {
            path: rel.clone(),
            reason,
        };
        let components = safe_components(&raw_path).ok_or_else(unsafe_path)?;
        let kind = entry.header().entry_type();
        let meta = entry_meta(entry, &rel)?;

        if meta.remove {
            if self.onto == Onto::Empty {
                return Err(malformed("a removal entry outside a delta"));
            }
            let empty = entry.header().entry_size().is_ok_and(|size| size == 0);
            if kind != EntryType::Regular || !empty {
                return Err(malformed("a removal entry that is not an empty file entry"));
            }
            return self.remove(&components, &rel);
        }
        let dev = match kind {
            EntryType::Char | EntryType::Block => Some(device_number(entry.header(), &rel)?),
            _ => None,
        };
        let xattr_names = meta.xattrs.keys().map(OsString::as_os_str);
        self.policy.check(&rel, kind, dev, meta.mode, xattr_names)?;

        let Some((leaf, parents)) = components.split_last() else {
            // Only the root's own directory entry may name the destination itself.
            if kind != EntryType::Directory {
                return Err(unsafe_path());
            }
            self.keep_dir(self.dest.to_path_buf(), meta, &rel)?;
            return Ok(());
        };
        let parent = self.resolve_parent(parents, &rel)?;
        let abs = parent.join(leaf);
        let create_error = |source| ArchiveError::Create {
            path: abs.clone(),
            source,
        };

        match kind {
            EntryType::Directory => {
                let existing = match fs::symlink_metadata(&abs) {
                    Ok(meta) => Some(meta),
                    Err(err) if err.kind() == io::ErrorKind::NotFound => None,
                    Err(err) => return Err(create_error(err)),
                };
                match existing {
                    // Made earlier as the parent of an entry listed before its directory, or
                    // kept, with what is below it, from the base of a delta.
                    Some(meta) if meta.is_dir() => {}
                    Some(_) if self.onto == Onto::Empty => {
                        return Err(create_error(Errno::EEXIST.into()))
                    }
                    _ => {
                        self.make_room(&abs, &parent)?;
                        // Private until its real mode is applied at the end.
                        fs::DirBuilder::new()
                            .mode(0o700)
                            .create(&abs)
                            .map_err(create_error)?;
                    }
                }
                self.keep_dir(abs, meta, &rel)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                // The crate would make a directory of a regular entry whose name ends in '/'.
                if raw_path.ends_with(b"/") {
                    return Err(malformed("a file entry whose name ends with '/'"));
                }
                self.make_room(&abs, &parent)?;
                // The crate opens with O_CREAT|O_EXCL (never through a symlink) and seeks
                // over the holes of sparse entries.
                entry.unpack(&abs).map_err(create_error)?;
                self.apply_metadata(&abs, &meta, false)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| malformed("a symlink without a target"))?;
                self.make_room(&abs, &parent)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &abs)
                    .map_err(create_error)?;
                self.apply_metadata(&abs, &meta, true)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| malformed("a hard link without a target"))?;
                let target_components = safe_components(&target).ok_or_else(unsafe_path)?;
                let (target_leaf, target_parents) =
                    target_components.split_last().ok_or_else(unsafe_path)?;
                let source = existing_parent(self.dest, target_parents, &rel)?
                    .ok_or_else(|| ArchiveError::Create {
                        path: self.dest.join(OsStr::from_bytes(&target)),
                        source: Errno::ENOENT.into(),
                    })?
                    .join(target_leaf);
                self.make_room(&abs, &parent)?;
                // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked, not followed.
                fs::hard_link(&source, &abs).map_err(create_error)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (node_type, dev) = match (kind, dev) {
                    (EntryType::Char, Some((major, minor))) => {
                        (SFlag::S_IFCHR, stat::makedev(major, minor))
                    }
                    (EntryType::Block, Some((major, minor))) => {
                        (SFlag::S_IFBLK, stat::makedev(major, minor))
                    }
                    _ => (SFlag::S_IFIFO, 0),
                };
                self.make_room(&abs, &parent)?;
                stat::mknod(&abs, node_type, Mode::empty(), dev)
                    .map_err(|errno| create_error(errno.into()))?;
                self.apply_metadata(&abs, &meta, false)?;
            }
            other => {
                return Err(ArchiveError::Unsupported {
                    path: rel.clone(),
                    kind: char::from(other.as_byte()),
                })
            }
        }
        Ok(())
    }

    /// Applies a removal entry.
    fn remove(&mut self, components: &[&OsStr], rel: &Path) -> Result<(), ArchiveError> {
        // Removing the destination would leave nothing to unpack into.
        let (leaf, parents) = components
            .split_last()
            .ok_or_else(|| ArchiveError::UnsafePath {
                path: rel.to_path_buf(),
            })?;
        let Some(parent) = existing_parent(self.dest, parents, rel)? else {
            return Ok(());
        };
        let abs = parent.join(leaf);
        self.touch(&parent)?;
        remove_entry(&abs)
    }

    /// Clears the way for an entry at `abs`: onto an existing tree, whatever has the name
    /// goes; onto an empty one, creating the entry fails if anything has.
    fn make_room(&mut self, abs: &Path, parent: &Path) -> Result<(), ArchiveError> {
        self.touch(parent)?;
        if self.onto == Onto::Existing {
            remove_entry(abs)?;
        }
        Ok(())
    }

    /// Keeps a directory's metadata to apply at the end.
    fn keep_dir(&mut self, abs: PathBuf, meta: EntryMeta, rel: &Path) -> Result<(), ArchiveError> {
        let xattr_bytes: usize = meta.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        let bytes = (abs.as_os_str().len() + xattr_bytes) as u64 + DIR_OVERHEAD;
        self.retain(bytes, rel)?;
        self.dirs.push((abs, meta));
        Ok(())
    }

    /// Counts `bytes` more held until the end, within the policy's limit.
    fn retain(&mut self, bytes: u64, rel: &Path) -> Result<(), ArchiveError> {
        self.retained = self.retained.saturating_add(bytes);
        let limit = self.policy.limits.retained;
        if self.retained > limit {
            return Err(ArchiveError::Retained {
                path: rel.to_path_buf(),
                limit,
            });
        }
        Ok(())
    }

    /// Keeps `dir`'s mtime from before this unpack first changes what is in it.
    fn touch(&mut self, dir: &Path) -> Result<(), ArchiveError> {
        if !self.touched.contains_key(dir) {
            let meta = fs::symlink_metadata(dir).map_err(|source| ArchiveError::Metadata {
                path: dir.to_path_buf(),
                what: "mtime",
                source,
            })?;
            let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
            self.retain(dir.as_os_str().len() as u64 + TOUCHED_OVERHEAD, dir)?;
            self.touched.insert(dir.to_path_buf(), mtime);
        }
        Ok(())
    }

    /// `dest` joined with `parents`, each checked to be a real directory and made (with a
    /// plain `mkdir`) if missing.
    fn resolve_parent(&mut self, parents: &[&OsStr], rel: &Path) -> Result<PathBuf, ArchiveError> {
        let mut path = self.dest.to_path_buf();
        for component in parents {
            let child = path.join(component);
            if !is_real_dir(&child, rel)? {
                self.touch(&path)?;
                if let Err(source) = fs::DirBuilder::new().mode(0o755).create(&child) {
                    return Err(ArchiveError::Create {
                        path: child,
                        source,
                    });
                }
            }
            path = child;
        }
        Ok(path)
    }

    fn apply_metadata(
        &self,
        path: &Path,
        meta: &EntryMeta,
        is_symlink: bool,
    ) -> Result<(), ArchiveError> {
        set_metadata(path, meta, is_symlink, self.onto == Onto::Existing)
    }
}

/// What is now at `path`, a directory under `dest` when it was kept or touched.
enum Now {
    /// A directory, reached from `dest` through directories only.
    Dir,
    /// It, or one of its parents, is a symlink.
    ThroughSymlink,
    /// It, or one of its parents, is gone or is not a directory.
    Replaced,
}

fn now_at(dest: &Path, path: &Path) -> Now {
    let Ok(rel) = path.strip_prefix(dest) else {
        return Now::Replaced;
    };
    let mut at = dest.to_path_buf();
    for component in rel.components() {
        at.push(component);
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => return Now::ThroughSymlink,
            _ => return Now::Replaced,
        }
    }
    Now::Dir
}

/// Removes whatever is at `abs`, a directory with everything below it; nothing there is
/// fine. `remove_dir_all` neither follows symlinks nor races with them (it works on the
/// directories it opened).
fn remove_entry(abs: &Path) -> Result<(), ArchiveError> {
    let removed = match fs::symlink_metadata(abs) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(abs),
        Ok(_) => fs::remove_file(abs),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    };
    removed.map_err(|source| ArchiveError::Remove {
        path: abs.to_path_buf(),
        source,
    })
}

fn entry_meta<R: Read>(entry: &mut Entry<'_, R>, rel: &Path) -> Result<EntryMeta, ArchiveError> {
    let decode_error = |source| ArchiveError::Decode {
        path: rel.to_path_buf(),
        source,
    };
    let malformed = |reason| ArchiveError::Malformed {
        path: rel.to_path_buf(),
        reason,
    };
    let header = entry.header();
    let mode = header.mode().map_err(decode_error)? & 0o7777;
    let uid = u32::try_from(header.uid().map_err(decode_error)?)
        .map_err(|_| malformed("a uid beyond 32 bits"))?;
    let gid = u32::try_from(header.gid().map_err(decode_error)?)
        .map_err(|_| malformed("a gid beyond 32 bits"))?;
    // Undoes the cast in the packer.
    let mtime = header.mtime().map_err(decode_error)? as i64;

    let mut xattrs = BTreeMap::new();
    let mut remove = false;
    if let Some(records) = entry.pax_extensions().map_err(decode_error)? {
        for record in records {
            let record = record.map_err(|_| malformed("a malformed PAX record"))?;
            let (key, value) = (record.key_bytes(), record.value_bytes());
            if key == REMOVE_KEY.as_bytes() {
                if value != REMOVE_VALUE {
                    return Err(malformed("a removal record with a value other than 1"));
                }
                remove = true;
            } else if let Some(xattr) = xattrs::from_pax_record(key, value) {
                let (name, value) = xattr.map_err(decode_error)?;
                if name.len() > XATTR_NAME_MAX || value.len() > XATTR_SIZE_MAX {
                    return Err(malformed("an xattr beyond the kernel's size limits"));
                }
                xattrs.insert(name, value);
            }
        }
    }
    Ok(EntryMeta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
        remove,
    })
}

/// The device number of a device entry.
fn device_number(header: &tar::Header, rel: &Path) -> Result<(u64, u64), ArchiveError> {
    let number = |field: io::Result<Option<u32>>| match field {
        Ok(Some(n)) => Ok(u64::from(n)),
        Ok(None) => Err(ArchiveError::Malformed {
            path: rel.to_path_buf(),
            reason: "a device entry without device numbers",
        }),
        Err(source) => Err(ArchiveError::Decode {
            path: rel.to_path_buf(),
            source,
        }),
    };
    Ok((
        number(header.device_major())?,
        number(header.device_minor())?,
    ))
}

fn metadata_error(path: &Path, what: &'static str, errno: Errno) -> ArchiveError {
    ArchiveError::Metadata {
        path: path.to_path_buf(),
        what,
        source: errno.into(),
    }
}

/// Owner first (it clears setuid/setgid and file capabilities), then xattrs, then the mode,
/// then the mtime, none of them following a symlink at `path`. With `sync_xattrs`, xattrs
/// the archive does not list are removed.
fn set_metadata(
    path: &Path,
    meta: &EntryMeta,
    is_symlink: bool,
    sync_xattrs: bool,
) -> Result<(), ArchiveError> {
    unistd::fchownat(
        None,
        path,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|errno| metadata_error(path, "owner", errno))?;
    if sync_xattrs {
        let present = match xattr::list(path) {
            Ok(names) => names.collect(),
            // A filesystem without xattrs has none to remove.
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
            Err(source) => {
                return Err(ArchiveError::Metadata {
                    path: path.to_path_buf(),
                    what: "extended attributes",
                    source,
                })
            }
        };
        for name in present
            .iter()
            .filter(|name| !meta.xattrs.contains_key(*name))
        {
            xattr::remove(path, name).map_err(|source| ArchiveError::RemoveXattr {
                path: path.to_path_buf(),
                name: name.clone(),
                source,
            })?;
        }
    }
    for (name, value) in &meta.xattrs {
        xattr::set(path, name, value).map_err(|source| ArchiveError::SetXattr {
            path: path.to_path_buf(),
            name: name.clone(),
            source,
        })?;
    }
    // Symlink modes are fixed at 0777 and chmod would act on the target.
    if !is_symlink {
        stat::fchmodat(
            None,
            path,
            Mode::from_bits_truncate(meta.mode),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(|errno| metadata_error(path, "mode", errno))?;
    }
    let mtime = TimeSpec::new(meta.mtime, 0);
    stat::utimensat(None, path, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(|errno| metadata_error(path, "mtime", errno))?;
    Ok(())
}
