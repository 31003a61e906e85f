//! Writing a tree, or what changed in it since a snapshot, as a tar stream.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat;
use tar::{Builder, EntryType, Header};

use super::{sparse, xattrs, ArchiveError, REMOVE_KEY, REMOVE_VALUE};
use crate::rootfs::delta::diff;
use crate::rootfs::snapshot::{EntryKind, EntryStat, Timestamp, TreeSnapshot};

/// Size of the name and link-name fields of a tar header.
pub(super) const NAME_FIELD_LEN: usize = 100;

/// Writes `dir`'s whole tree (not including `dir` itself as an entry name prefix: paths are
/// relative, e.g. "etc/passwd") as a tar stream to `out`, and returns the writer and the
/// snapshot of exactly the entries archived, from which [`pack_delta`] later finds what
/// changed.
///
/// The walk is depth-first in byte order of the names, so the same tree always gives the same
/// stream. Symlinks are stored, never followed. Sockets are skipped: a socket inode is only
/// the name a live process listens under, a copy would be a node nobody listens on, and
/// restoring the listener (CRIU does that for the checkpointed processes) binds a fresh one.
///
/// The tree may change while it is packed (the base archive is packed while the container
/// runs). Each entry is statted before its content is read, so a change made while it is
/// read shows in a later [`pack_delta`]; an entry deleted before it is read is left out of
/// both the archive and the snapshot. A file replaced by another inode, or shrinking, while
/// it is being read fails the packing, since no stream could describe it.
///
/// Run as root: without `CAP_SYS_ADMIN` the kernel hides `trusted.*` xattrs, which overlayfs
/// depends on.
pub fn pack_dir<W: Write>(dir: &Path, out: W) -> Result<(W, TreeSnapshot), ArchiveError> {
    let started = Timestamp::now();
    let mut packer = Packer::new(out);
    let mut entries = BTreeMap::new();
    walk(dir, |abs, rel, stat| {
        if let Appended::Written = packer.append(abs, rel, &stat)? {
            entries.insert(rel.to_path_buf(), stat);
        }
        Ok(())
    })?;
    let out = packer.finish(dir)?;
    Ok((out, TreeSnapshot { started, entries }))
}

/// What [`pack_delta`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaSummary {
    /// New or changed entries, directories and hard links included.
    pub entries: u64,
    /// Removal entries.
    pub removed: u64,
    /// Length of the stream.
    pub bytes: u64,
}

/// Writes to `out` the delta (see the [module docs](super)) that turns a copy of what
/// `base` describes, as [`pack_dir`] archived it, into `dir`'s tree as it is now.
///
/// Meant for a tree that no longer changes (the container is frozen): an entry that
/// vanishes between the walk and the reading of its content fails the packing, since
/// leaving it out would leave the destination's old copy in place.
pub fn pack_delta<W: Write>(
    dir: &Path,
    base: &TreeSnapshot,
    out: W,
) -> Result<(W, DeltaSummary), ArchiveError> {
    let started = Timestamp::now();
    let mut entries = BTreeMap::new();
    walk(dir, |_, rel, stat| {
        entries.insert(rel.to_path_buf(), stat);
        Ok(())
    })?;
    let now = TreeSnapshot { started, entries };
    let delta = diff(base, &now);

    let mut packer = Packer::new(Counting {
        inner: out,
        bytes: 0,
    });
    for rel in &delta.removed {
        packer.append_removal(rel)?;
    }
    for rel in &delta.changed {
        let abs = dir.join(rel);
        if let Appended::Vanished(source) = packer.append(&abs, rel, &now.entries[rel])? {
            return Err(read_error(&abs, source));
        }
    }
    let counted = packer.finish(dir)?;
    let summary = DeltaSummary {
        entries: delta.changed.len() as u64,
        removed: delta.removed.len() as u64,
        bytes: counted.bytes,
    };
    Ok((counted.inner, summary))
}

/// Visits every entry of `dir`'s tree but sockets, `dir` itself first, depth-first in byte
/// order of the names. An entry deleted before it is statted is skipped and a directory
/// deleted before it is listed has nothing below it: a running container's temporary files
/// come and go.
fn walk(
    dir: &Path,
    mut visit: impl FnMut(&Path, &Path, EntryStat) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let root = fs::symlink_metadata(dir).map_err(|source| read_error(dir, source))?;
    if !root.is_dir() {
        return Err(read_error(dir, Errno::ENOTDIR.into()));
    }
    let mut stack = vec![(dir.to_path_buf(), PathBuf::new())];
    while let Some((abs, rel)) = stack.pop() {
        let meta = match fs::symlink_metadata(&abs) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound && rel != Path::new("") => continue,
            Err(source) => return Err(read_error(&abs, source)),
        };
        let Some(stat) = EntryStat::of(&meta) else {
            continue;
        };
        visit(&abs, &rel, stat)?;
        if stat.kind == EntryKind::Dir {
            for name in sorted_names(&abs)?.into_iter().rev() {
                stack.push((abs.join(&name), rel.join(&name)));
            }
        }
    }
    Ok(())
}

/// Whether an entry made it into the archive.
#[derive(Debug)]
enum Appended {
    Written,
    /// It was deleted before anything of it was written.
    Vanished(io::Error),
}

struct Packer<W: Write> {
    builder: Builder<W>,
    /// Archive name of the first path archived for each multiply-linked inode.
    first_names: HashMap<(u64, u64), Vec<u8>>,
}

impl<W: Write> Packer<W> {
    fn new(out: W) -> Self {
        Self {
            builder: Builder::new(out),
            first_names: HashMap::new(),
        }
    }

    /// Ends the archive and returns the writer.
    fn finish(self, dir: &Path) -> Result<W, ArchiveError> {
        self.builder
            .into_inner()
            .map_err(|source| ArchiveError::Write {
                path: dir.to_path_buf(),
                source,
            })
    }

    /// Appends the entry at `abs` as `stat`, taken before, describes it.
    fn append(
        &mut self,
        abs: &Path,
        rel: &Path,
        stat: &EntryStat,
    ) -> Result<Appended, ArchiveError> {
        let name = archive_name(rel, stat.kind == EntryKind::Dir);
        let mut header = Header::new_gnu();
        header.set_mode(stat.mode);
        header.set_uid(u64::from(stat.uid));
        header.set_gid(u64::from(stat.gid));
        // A pre-1970 mtime wraps to a huge u64, which the crate stores in base-256 and reads
        // back to the same bits, so the cast round-trips.
        header.set_mtime(stat.mtime.secs as u64);
        header.set_size(0);

        let inode = (stat.dev, stat.ino);
        let linkable = stat.kind != EntryKind::Dir && stat.nlink > 1;
        if let Some(first) = self.first_names.get(&inode).filter(|_| linkable) {
            let target = first.clone();
            header.set_entry_type(EntryType::Link);
            self.write_entry(rel, &name, header, Some(&target), &[], io::empty())?;
            return Ok(Appended::Written);
        }

        let records = match xattrs::read(abs) {
            Ok(xattrs) => xattrs::pax_records(&xattrs),
            Err(err) => return vanished_or(abs, err),
        };
        header.set_entry_type(entry_type(stat.kind));
        let written = |()| Appended::Written;
        let appended = match stat.kind {
            EntryKind::File => self.append_file(abs, rel, &name, header, stat, &records)?,
            EntryKind::Symlink => match fs::read_link(abs) {
                Ok(link) => {
                    let target = link.as_os_str().as_bytes();
                    self.write_entry(rel, &name, header, Some(target), &records, io::empty())
                        .map(written)?
                }
                Err(err) => vanished_or(abs, err)?,
            },
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                // Linux majors have 12 bits and minors 20, so both fit the u32 (and the
                // 7-digit octal header fields).
                header
                    .set_device_major(stat::major(stat.rdev) as u32)
                    .and_then(|()| header.set_device_minor(stat::minor(stat.rdev) as u32))
                    .map_err(|source| write_error(rel, source))?;
                self.write_entry(rel, &name, header, None, &records, io::empty())
                    .map(written)?
            }
            EntryKind::Dir | EntryKind::Fifo => self
                .write_entry(rel, &name, header, None, &records, io::empty())
                .map(written)?,
        };
        if linkable && matches!(appended, Appended::Written) {
            self.first_names.insert(inode, name);
        }
        Ok(appended)
    }

    fn append_file(
        &mut self,
        abs: &Path,
        rel: &Path,
        name: &[u8],
        mut header: Header,
        stat: &EntryStat,
        records: &[(String, Vec<u8>)],
    ) -> Result<Appended, ArchiveError> {
        // O_NONBLOCK: should a FIFO have taken the file's name since the stat, opening it
        // must not wait for a writer; the identity check below then refuses it.
        let opened = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(abs);
        let file = match opened {
            Ok(file) => file,
            Err(err) => return vanished_or(abs, err),
        };
        let opened = file.metadata().map_err(|source| read_error(abs, source))?;
        if (opened.dev(), opened.ino()) != (stat.dev, stat.ino) {
            return Err(read_error(
                abs,
                io::Error::other("replaced while it was being archived"),
            ));
        }
        let size = opened.len();
        let (segments, sparse_map) = match sparse::data_segments(&file, &opened) {
            Ok(Some(segments)) => {
                let map = sparse::encode_map(&mut header, &segments, size)
                    .map_err(|source| write_error(rel, source))?;
                (segments, map)
            }
            Ok(None) => {
                header.set_size(size);
                (vec![(0, size)], Vec::new())
            }
            Err(source) => return Err(read_error(abs, source)),
        };
        let mut content = sparse::SegmentReader::new(&file, segments);
        let written = self.write_entry(
            rel,
            name,
            header,
            None,
            records,
            io::Cursor::new(sparse_map).chain(&mut content),
        );
        match content.failure.take() {
            Some(source) => Err(read_error(abs, source)),
            None => written.map(|()| Appended::Written),
        }
    }

    /// Appends the removal entry for `rel` (see the [module docs](super)).
    fn append_removal(&mut self, rel: &Path) -> Result<(), ArchiveError> {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(0);
        let records = [(REMOVE_KEY.to_owned(), REMOVE_VALUE.to_vec())];
        let name = archive_name(rel, false);
        self.write_entry(rel, &name, header, None, &records, io::empty())
    }

    fn write_entry<R: Read>(
        &mut self,
        rel: &Path,
        name: &[u8],
        mut header: Header,
        link_target: Option<&[u8]>,
        pax_records: &[(String, Vec<u8>)],
        data: R,
    ) -> Result<(), ArchiveError> {
        if !pax_records.is_empty() {
            self.builder
                .append_pax_extensions(pax_records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(|source| write_error(rel, source))?;
        }
        if let Some(target) = link_target {
            if target.len() > NAME_FIELD_LEN {
                self.append_long_name(EntryType::GNULongLink, target)
                    .map_err(|source| write_error(rel, source))?;
            }
            fill_name_field(&mut header.as_old_mut().linkname, target);
        }
        if name.len() > NAME_FIELD_LEN {
            self.append_long_name(EntryType::GNULongName, name)
                .map_err(|source| write_error(rel, source))?;
        }
        fill_name_field(&mut header.as_old_mut().name, name);
        header.set_cksum();
        self.builder
            .append(&header, data)
            .map_err(|source| write_error(rel, source))
    }

    /// Writes a GNU `L` or `K` entry carrying the full bytes of the next entry's name or
    /// link target.
    fn append_long_name(&mut self, kind: EntryType, bytes: &[u8]) -> io::Result<()> {
        let mut header = Header::new_gnu();
        fill_name_field(&mut header.as_old_mut().name, b"././@LongLink");
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        // GNU tar counts the terminating NUL; the crate's reader strips it.
        header.set_size(bytes.len() as u64 + 1);
        header.set_entry_type(kind);
        header.set_cksum();
        self.builder.append(&header, bytes.chain(&[0u8][..]))
    }
}

/// The header type of an entry of `kind`; [`sparse::encode_map`] turns files with holes
/// into sparse entries.
fn entry_type(kind: EntryKind) -> EntryType {
    match kind {
        EntryKind::File => EntryType::Regular,
        EntryKind::Dir => EntryType::Directory,
        EntryKind::Symlink => EntryType::Symlink,
        EntryKind::Fifo => EntryType::Fifo,
        EntryKind::CharDevice => EntryType::Char,
        EntryKind::BlockDevice => EntryType::Block,
    }
}

/// A deleted entry is left out as long as nothing of it was written; other errors fail.
fn vanished_or(abs: &Path, err: io::Error) -> Result<Appended, ArchiveError> {
    if err.kind() == io::ErrorKind::NotFound {
        Ok(Appended::Vanished(err))
    } else {
        Err(read_error(abs, err))
    }
}

/// Counts the bytes that reach the inner writer.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn read_error(path: &Path, source: io::Error) -> ArchiveError {
    ArchiveError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn write_error(rel: &Path, source: io::Error) -> ArchiveError {
    ArchiveError::Write {
        path: rel.to_path_buf(),
        source,
    }
}

fn sorted_names(dir: &Path) -> Result<Vec<OsString>, ArchiveError> {
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(read_error(dir, source)),
    };
    let mut names = Vec::new();
    for entry in listing {
        names.push(entry.map_err(|source| read_error(dir, source))?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// The name stored in the archive: GNU tar's conventions of `./` for the root and a trailing
/// slash on directories.
fn archive_name(rel: &Path, is_dir: bool) -> Vec<u8> {
    if rel.as_os_str().is_empty() {
        return b"./".to_vec();
    }
    let mut name = rel.as_os_str().as_bytes().to_vec();
    if is_dir {
        name.push(b'/');
    }
    name
}

/// Copies as much of `bytes` as fits; longer values travel in a preceding long-name entry and
/// the reader ignores this truncated copy.
pub(super) fn fill_name_field(field: &mut [u8; NAME_FIELD_LEN], bytes: &[u8]) {
    let len = bytes.len().min(NAME_FIELD_LEN);
    field[..len].copy_from_slice(&bytes[..len]);
    field[len..].fill(0);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_deleted_before_it_is_read_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&first, b"linked").unwrap();
        fs::hard_link(&first, &second).unwrap();
        let stat_of = |path: &Path| EntryStat::of(&fs::symlink_metadata(path).unwrap()).unwrap();
        let (first_stat, second_stat) = (stat_of(&first), stat_of(&second));
        fs::remove_file(&first).unwrap();

        let mut packer = Packer::new(Vec::new());
        let appended = packer.append(&first, Path::new("a"), &first_stat).unwrap();
        assert!(matches!(appended, Appended::Vanished(_)), "{appended:?}");
        let appended = packer
            .append(&second, Path::new("b"), &second_stat)
            .unwrap();
        assert!(matches!(appended, Appended::Written), "{appended:?}");
        let archive = packer.finish(dir.path()).unwrap();

        // The other name holds the content: it cannot link to an entry that is not there.
        let mut reader = tar::Archive::new(archive.as_slice());
        let kinds: Vec<_> = reader
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path_bytes().into_owned(), e.header().entry_type())
            })
            .collect();
        assert_eq!(kinds, [(b"b".to_vec(), EntryType::Regular)]);
    }
}
