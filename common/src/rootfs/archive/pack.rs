//! Writing a tree, or what changed in it since a snapshot, as a tar stream.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use tar::{Builder, EntryType, Header};

use super::entry::{
    fill_name_field, read_error, removal, write_error, Content, Prepared, Preparer, Replaced,
    END_OF_ARCHIVE, NAME_FIELD_LEN,
};
use super::{sparse, ArchiveError};
use crate::rootfs::delta::{diff, TreeDelta};
use crate::rootfs::snapshot::{EntryKind, EntryStat, Timestamp, TreeSnapshot};

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
    pack_dir_within(dir, out, u64::MAX)
}

/// [`pack_dir`], leaving out every entry that would take the stream beyond `limit` bytes,
/// end-of-archive marker included, from the archive and from the snapshot alike.
///
/// The receiver refuses a stream longer than the size declared before it, and the tree of a
/// running container may grow between [`measure_dir`] and the packing; an entry left out
/// here is missing from the snapshot, so [`pack_delta`] sends it as new.
pub fn pack_dir_within<W: Write>(
    dir: &Path,
    out: W,
    limit: u64,
) -> Result<(W, TreeSnapshot), ArchiveError> {
    let started = Timestamp::now();
    let mut packer = Packer::new(out);
    let mut entries = BTreeMap::new();
    walk(dir, |abs, rel, stat| {
        let Some(entry) = packer.preparer.prepare(abs, rel, &stat)? else {
            return Ok(());
        };
        let fits = packer
            .written()
            .checked_add(entry.len)
            .and_then(|end| end.checked_add(END_OF_ARCHIVE))
            .is_some_and(|end| end <= limit);
        if fits {
            packer.write(entry)?;
            entries.insert(rel.to_path_buf(), stat);
        }
        Ok(())
    })?;
    let out = packer.finish(dir)?.inner;
    Ok((out, TreeSnapshot { started, entries }))
}

/// The exact length of the stream [`pack_dir`] would write for `dir` as it is now: a walk
/// that reads every entry's metadata, xattrs and hole map, but no file content.
///
/// Senders declare a stream's size before its first byte (see [`crate::transfer`]); for a
/// tree that does not change this is that size. Files replaced while they are measured are
/// measured as they are now, since the measurement of a changing tree is an estimate anyway.
pub fn measure_dir(dir: &Path) -> Result<u64, ArchiveError> {
    let mut preparer = Preparer::new(Replaced::Measure);
    let mut total = END_OF_ARCHIVE;
    walk(dir, |abs, rel, stat| {
        if let Some(entry) = preparer.prepare(abs, rel, &stat)? {
            total = total.saturating_add(entry.len);
            preparer.accept(&entry);
        }
        Ok(())
    })?;
    Ok(total)
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
    DeltaPlan::new(dir, base)?.pack(out)
}

/// A delta found and measured, not yet written: its length is known before the first byte,
/// so that the stream carrying it can declare its size.
#[derive(Debug)]
pub struct DeltaPlan {
    dir: PathBuf,
    now: TreeSnapshot,
    delta: TreeDelta,
    len: u64,
}

impl DeltaPlan {
    /// Walks `dir`, finds what changed since `base` and measures the delta's stream.
    pub fn new(dir: &Path, base: &TreeSnapshot) -> Result<Self, ArchiveError> {
        let started = Timestamp::now();
        let mut entries = BTreeMap::new();
        walk(dir, |_, rel, stat| {
            entries.insert(rel.to_path_buf(), stat);
            Ok(())
        })?;
        let now = TreeSnapshot { started, entries };
        let delta = diff(base, &now);
        let mut preparer = Preparer::new(Replaced::Fail);
        let mut len = END_OF_ARCHIVE;
        for rel in &delta.removed {
            len = len.saturating_add(removal(rel).len);
        }
        for rel in &delta.changed {
            let abs = dir.join(rel);
            let entry = preparer
                .prepare(&abs, rel, &now.entries[rel])?
                .ok_or_else(|| read_error(&abs, io::ErrorKind::NotFound.into()))?;
            len = len.saturating_add(entry.len);
            preparer.accept(&entry);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            now,
            delta,
            len,
        })
    }

    /// The length of the stream [`DeltaPlan::pack`] writes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the delta has no entries (its stream is then only the end-of-archive marker).
    pub fn is_empty(&self) -> bool {
        self.delta.is_empty()
    }

    /// Writes the delta; an entry that changed since it was measured, so that the stream
    /// would outgrow [`DeltaPlan::len`], fails the packing.
    pub fn pack<W: Write>(self, out: W) -> Result<(W, DeltaSummary), ArchiveError> {
        let mut packer = Packer::new(out);
        for rel in &self.delta.removed {
            packer.write(removal(rel))?;
        }
        for rel in &self.delta.changed {
            let abs = self.dir.join(rel);
            let entry = packer
                .preparer
                .prepare(&abs, rel, &self.now.entries[rel])?
                .ok_or_else(|| read_error(&abs, io::ErrorKind::NotFound.into()))?;
            let end = packer.written().saturating_add(entry.len);
            if end.saturating_add(END_OF_ARCHIVE) > self.len {
                return Err(read_error(
                    &abs,
                    io::Error::other("grew after the delta was measured"),
                ));
            }
            packer.write(entry)?;
        }
        let counted = packer.finish(&self.dir)?;
        let summary = DeltaSummary {
            entries: self.delta.changed.len() as u64,
            removed: self.delta.removed.len() as u64,
            bytes: counted.bytes,
        };
        Ok((counted.inner, summary))
    }
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

struct Packer<W: Write> {
    builder: Builder<Counting<W>>,
    preparer: Preparer,
}

impl<W: Write> Packer<W> {
    fn new(out: W) -> Self {
        Self {
            builder: Builder::new(Counting {
                inner: out,
                bytes: 0,
            }),
            preparer: Preparer::new(Replaced::Fail),
        }
    }

    /// Bytes written so far.
    fn written(&self) -> u64 {
        self.builder.get_ref().bytes
    }

    /// Ends the archive and returns the writer.
    fn finish(self, dir: &Path) -> Result<Counting<W>, ArchiveError> {
        self.builder
            .into_inner()
            .map_err(|source| ArchiveError::Write {
                path: dir.to_path_buf(),
                source,
            })
    }

    /// Writes `entry`: its PAX header, long-name entries, header and content.
    fn write(&mut self, mut entry: Prepared) -> Result<(), ArchiveError> {
        let rel = entry.rel.clone();
        let wrote = |result: io::Result<()>| result.map_err(|source| write_error(&rel, source));
        if !entry.pax.is_empty() {
            let mut header = Header::new_ustar();
            header.set_size(entry.pax.len() as u64);
            header.set_entry_type(EntryType::XHeader);
            header.set_cksum();
            wrote(self.builder.append(&header, entry.pax.as_slice()))?;
        }
        if let Some(target) = &entry.link_target {
            if target.len() > NAME_FIELD_LEN {
                wrote(self.append_long_name(EntryType::GNULongLink, target))?;
            }
            fill_name_field(&mut entry.header.as_old_mut().linkname, target);
        }
        if entry.name.len() > NAME_FIELD_LEN {
            wrote(self.append_long_name(EntryType::GNULongName, &entry.name))?;
        }
        fill_name_field(&mut entry.header.as_old_mut().name, &entry.name);
        entry.header.set_cksum();
        match &entry.content {
            Content::Empty => wrote(self.builder.append(&entry.header, io::empty()))?,
            Content::File {
                abs,
                file,
                segments,
                sparse_map,
            } => {
                let mut content = sparse::SegmentReader::new(file, segments.clone());
                let written = self.builder.append(
                    &entry.header,
                    io::Cursor::new(sparse_map).chain(&mut content),
                );
                if let Some(source) = content.failure.take() {
                    return Err(read_error(abs, source));
                }
                wrote(written)?;
            }
        }
        self.preparer.accept(&entry);
        Ok(())
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
        let vanished = packer.preparer.prepare(&first, Path::new("a"), &first_stat);
        assert!(matches!(vanished, Ok(None)));
        let entry = packer
            .preparer
            .prepare(&second, Path::new("b"), &second_stat);
        packer.write(entry.unwrap().unwrap()).unwrap();
        let archive = packer.finish(dir.path()).unwrap().inner;

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
