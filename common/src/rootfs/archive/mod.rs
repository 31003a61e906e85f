//! A container's overlay upper directory as a tar stream.
//!
//! The stream is a GNU-format tar archive, so that `tar -tvf` can inspect it, but it is only
//! meant to be read back by [`unpack_dir`]. The choices below are driven by the upper dir
//! having to come back bit-for-bit, overlayfs metadata included:
//!
//! * Entry headers are built by hand with [`Header::new_gnu`] and written with
//!   [`Builder::append`], because the `tar` crate's path helpers normalise names and link
//!   targets (they drop `.` components and collapse `//`) and reject long names that start
//!   with a byte that is not UTF-8. Names and link targets are copied as raw bytes; longer
//!   than 100 bytes, they get a GNU `L`/`K` long-name entry holding the exact bytes.
//! * Owners are numeric only, modes include the setuid/setgid/sticky bits and mtimes are whole
//!   seconds. The tree's root is stored as the directory entry `./` so that its owner, mode
//!   and xattrs (overlayfs keeps `trusted.overlay.*` on the upper root) travel too.
//! * Extended attributes of every namespace travel as PAX records. `SCHILY.xattr.<name>` with
//!   the raw value is used whenever the `tar` crate's PAX reader can round-trip it; that reader
//!   splits records at `\n` rather than honouring their length prefix, so a name containing
//!   `=` or `\n` or non-UTF-8 bytes, or a value containing `\n` (binary ones such as
//!   `trusted.overlay.origin`, ACLs or file capabilities easily do), is written in libarchive's
//!   `LIBARCHIVE.xattr.<percent-encoded name>=<base64 value>` form instead (standard alphabet,
//!   unpadded as libarchive writes it; padded values are read too).
//! * Files that share an inode are stored once; later names become hard-link entries
//!   pointing at the first name.
//! * Files with holes (found with `SEEK_DATA`/`SEEK_HOLE`) are written as old-GNU sparse
//!   entries: the data map lives in the header's four slots plus as many 21-slot extension
//!   blocks as needed, and only the data is stored. The `tar` crate reads that format and
//!   recreates the holes by seeking, which is why regular files are unpacked with
//!   [`tar::Entry::unpack`].
//! * Sockets are not archived (see [`pack_dir`]).
//!
//! Unpacking does the rest by hand, entry by entry: the crate's own unpacker turns device
//! nodes and FIFOs into regular files and sets xattrs on regular files only.

use std::collections::btree_map::BTreeMap;
use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{self, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid, Whence};
use percent_encoding::{percent_decode, percent_encode, AsciiSet, CONTROLS};
use tar::{Builder, Entry, EntryType, GnuExtSparseHeader, Header};

/// Size of the name and link-name fields of a tar header.
const NAME_FIELD_LEN: usize = 100;
/// Sparse map slots in the main GNU header; the rest go to extension blocks.
const HEADER_SPARSE_SLOTS: usize = 4;
/// Sparse map slots in each GNU extension block.
const EXT_SPARSE_SLOTS: usize = 21;
const TAR_BLOCK: u64 = 512;
const SCHILY_XATTR: &str = "SCHILY.xattr.";
const LIBARCHIVE_XATTR: &str = "LIBARCHIVE.xattr.";
/// What libarchive escapes in xattr names: everything but printable ASCII (the crate always
/// escapes non-ASCII bytes), and `%` and `=`, which would break the escaping or the record.
const XATTR_NAME_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'=');
/// libarchive writes xattr values without padding and its reader takes them either way.
const XATTR_VALUE_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why packing or unpacking a tree failed.
///
/// Filesystem errors name the absolute path they happened on; errors about the archive's
/// content name the entry's path as stored in the archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading the tree being packed.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing the archive stream while packing.
    #[error("writing the archive entry for {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading or decoding the archive stream while unpacking; `path` is the entry, or the
    /// destination directory when no entry could be read.
    #[error("decoding the archive at {path}")]
    Decode {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating a file, directory, link or node while unpacking.
    #[error("creating {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Setting the owner, mode or mtime of an unpacked entry.
    #[error("setting the {what} of {path}")]
    Metadata {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// Setting an extended attribute on an unpacked entry.
    #[error("setting extended attribute {name:?} on {path}")]
    SetXattr {
        path: PathBuf,
        name: OsString,
        #[source]
        source: io::Error,
    },
    /// The entry (or the target of a hard link) is absolute, contains `..`, would replace
    /// the destination itself, or leads through a symlink.
    #[error("archive entry {path} would be unpacked outside the destination")]
    UnsafePath { path: PathBuf },
    /// A tar entry type that has no meaning in an upper dir (e.g. `g`, `V`).
    #[error("archive entry {path} has type {kind:?}, which cannot be recreated")]
    Unsupported { path: PathBuf, kind: char },
    /// The entry is inconsistent in a way the `tar` crate does not catch.
    #[error("archive entry {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: &'static str },
}

/// Writes `dir`'s whole tree (not including `dir` itself as an entry name prefix: paths are
/// relative, e.g. "etc/passwd") as a tar stream to `out` and returns the writer.
///
/// The walk is depth-first in byte order of the names, so the same tree always gives the same
/// stream. Symlinks are stored, never followed. Sockets are skipped: a socket inode is only
/// the name a live process listens under, a copy would be a node nobody listens on, and
/// restoring the listener (CRIU does that for the checkpointed processes) binds a fresh one.
///
/// Run as root: without `CAP_SYS_ADMIN` the kernel hides `trusted.*` xattrs, which overlayfs
/// depends on.
pub fn pack_dir<W: Write>(dir: &Path, out: W) -> Result<W, ArchiveError> {
    let root = fs::symlink_metadata(dir).map_err(|source| read_error(dir, source))?;
    if !root.is_dir() {
        return Err(read_error(dir, Errno::ENOTDIR.into()));
    }
    let mut packer = Packer {
        builder: Builder::new(out),
        first_names: HashMap::new(),
    };
    let mut stack = vec![(dir.to_path_buf(), PathBuf::new())];
    while let Some((abs, rel)) = stack.pop() {
        let meta = fs::symlink_metadata(&abs).map_err(|source| read_error(&abs, source))?;
        if meta.file_type().is_socket() {
            continue;
        }
        packer.append(&abs, &rel, &meta)?;
        if meta.is_dir() {
            for name in sorted_names(&abs)?.into_iter().rev() {
                stack.push((abs.join(&name), rel.join(&name)));
            }
        }
    }
    packer
        .builder
        .into_inner()
        .map_err(|source| ArchiveError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

struct Packer<W: Write> {
    builder: Builder<W>,
    /// Archive name of the first path seen for each multiply-linked inode.
    first_names: HashMap<(u64, u64), Vec<u8>>,
}

impl<W: Write> Packer<W> {
    fn append(&mut self, abs: &Path, rel: &Path, meta: &Metadata) -> Result<(), ArchiveError> {
        let name = archive_name(rel, meta.is_dir());
        let mut header = Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(u64::from(meta.uid()));
        header.set_gid(u64::from(meta.gid()));
        // A pre-1970 mtime wraps to a huge u64, which the crate stores in base-256 and reads
        // back to the same bits, so the cast round-trips.
        header.set_mtime(meta.mtime() as u64);
        header.set_size(0);

        if !meta.is_dir() && meta.nlink() > 1 {
            match self.first_names.entry((meta.dev(), meta.ino())) {
                MapEntry::Occupied(first) => {
                    let target = first.get().clone();
                    header.set_entry_type(EntryType::Link);
                    return self.write_entry(rel, &name, header, Some(&target), &[], io::empty());
                }
                MapEntry::Vacant(slot) => {
                    slot.insert(name.clone());
                }
            }
        }

        let xattrs = read_xattrs(abs)?;
        let file_type = meta.file_type();
        if file_type.is_file() {
            return self.append_file(abs, rel, &name, header, meta, &xattrs);
        }
        let mut target = None;
        if file_type.is_dir() {
            header.set_entry_type(EntryType::Directory);
        } else if file_type.is_symlink() {
            header.set_entry_type(EntryType::Symlink);
            let link = fs::read_link(abs).map_err(|source| read_error(abs, source))?;
            target = Some(link.into_os_string().into_vec());
        } else if file_type.is_fifo() {
            header.set_entry_type(EntryType::Fifo);
        } else {
            header.set_entry_type(if file_type.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            });
            // Linux majors have 12 bits and minors 20, so both fit the u32 (and the 7-digit
            // octal header fields).
            let rdev = meta.rdev();
            header
                .set_device_major(stat::major(rdev) as u32)
                .and_then(|()| header.set_device_minor(stat::minor(rdev) as u32))
                .map_err(|source| write_error(rel, source))?;
        }
        self.write_entry(rel, &name, header, target.as_deref(), &xattrs, io::empty())
    }

    fn append_file(
        &mut self,
        abs: &Path,
        rel: &Path,
        name: &[u8],
        mut header: Header,
        meta: &Metadata,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), ArchiveError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(abs)
            .map_err(|source| read_error(abs, source))?;
        let opened = file.metadata().map_err(|source| read_error(abs, source))?;
        if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
            return Err(read_error(
                abs,
                io::Error::other("replaced while it was being archived"),
            ));
        }
        let size = opened.len();
        let (segments, sparse_map) = match data_segments(&file, &opened) {
            Ok(Some(segments)) => {
                let map = encode_sparse_map(&mut header, &segments, size)
                    .map_err(|source| write_error(rel, source))?;
                (segments, map)
            }
            Ok(None) => {
                header.set_entry_type(EntryType::Regular);
                header.set_size(size);
                (vec![(0, size)], Vec::new())
            }
            Err(source) => return Err(read_error(abs, source)),
        };
        let mut content = SegmentReader::new(&file, segments);
        let written = self.write_entry(
            rel,
            name,
            header,
            None,
            xattrs,
            io::Cursor::new(sparse_map).chain(&mut content),
        );
        // The builder cannot tell a failed read of the file from a failed write of the
        // stream; the reader kept its own error so the report blames the right side.
        match content.failure.take() {
            Some(source) => Err(read_error(abs, source)),
            None => written,
        }
    }

    fn write_entry<R: Read>(
        &mut self,
        rel: &Path,
        name: &[u8],
        mut header: Header,
        link_target: Option<&[u8]>,
        xattrs: &[(OsString, Vec<u8>)],
        data: R,
    ) -> Result<(), ArchiveError> {
        let records = pax_xattr_records(xattrs);
        if !records.is_empty() {
            self.builder
                .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
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
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|source| read_error(dir, source))? {
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
fn fill_name_field(field: &mut [u8; NAME_FIELD_LEN], bytes: &[u8]) {
    let len = bytes.len().min(NAME_FIELD_LEN);
    field[..len].copy_from_slice(&bytes[..len]);
    field[len..].fill(0);
}

/// All xattrs of `path` (not following symlinks), sorted by name.
fn read_xattrs(path: &Path) -> Result<Vec<(OsString, Vec<u8>)>, ArchiveError> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(source) => return Err(read_error(path, source)),
    };
    let mut xattrs = Vec::new();
    for name in names {
        // `None` means it was removed since the listing; there is nothing left to copy.
        if let Some(value) = xattr::get(path, &name).map_err(|source| read_error(path, source))? {
            xattrs.push((name, value));
        }
    }
    xattrs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(xattrs)
}

fn pax_xattr_records(xattrs: &[(OsString, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    xattrs
        .iter()
        .map(|(name, value)| {
            let raw_name = std::str::from_utf8(name.as_bytes())
                .ok()
                .filter(|n| !n.contains(['=', '\n']));
            match raw_name {
                Some(n) if !value.contains(&b'\n') => (format!("{SCHILY_XATTR}{n}"), value.clone()),
                _ => (
                    format!(
                        "{LIBARCHIVE_XATTR}{}",
                        percent_encode(name.as_bytes(), XATTR_NAME_ESCAPES)
                    ),
                    XATTR_VALUE_BASE64.encode(value).into_bytes(),
                ),
            }
        })
        .collect()
}

/// The byte ranges of `file` that hold data, or `None` if the file has no holes.
///
/// Every range but the last is stretched to a multiple of 512 bytes (reading zeros from the
/// hole that follows), since the GNU sparse format stores each range in whole tar blocks.
fn data_segments(file: &File, meta: &Metadata) -> io::Result<Option<Vec<(u64, u64)>>> {
    let size = meta.len();
    // A fully allocated file cannot have holes; skip the lseek scan for the common case.
    if meta.blocks() * 512 >= size {
        return Ok(None);
    }
    let fd = file.as_raw_fd();
    let mut segments: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match unistd::lseek64(fd, pos as i64, Whence::SeekData) {
            Ok(offset) => offset as u64,
            Err(Errno::ENXIO) => break,
            // Without SEEK_DATA support the whole file is simply archived as data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(None),
            Err(errno) => return Err(errno.into()),
        };
        if start >= size {
            break;
        }
        let hole = match unistd::lseek64(fd, start as i64, Whence::SeekHole) {
            Ok(offset) => offset as u64,
            Err(Errno::ENXIO) => size,
            Err(errno) => return Err(errno.into()),
        };
        if hole <= start {
            return Err(io::Error::other(
                "SEEK_HOLE went backwards: the file changed while it was being archived",
            ));
        }
        let end = hole.min(size).next_multiple_of(TAR_BLOCK).min(size);
        match segments.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => segments.push((start, end)),
        }
        pos = end;
    }
    if segments == [(0, size)] {
        return Ok(None);
    }
    Ok(Some(segments))
}

/// Turns `header` into an old-GNU sparse header for `segments` of a file of `size` bytes and
/// returns the extension blocks that must follow it in the stream.
fn encode_sparse_map(
    header: &mut Header,
    segments: &[(u64, u64)],
    size: u64,
) -> io::Result<Vec<u8>> {
    // A final empty segment at the end of the file records the real size even when the file
    // ends in a hole; the crate's reader checks that the map ends exactly there.
    let map: Vec<(u64, u64)> = segments
        .iter()
        .map(|&(start, end)| (start, end - start))
        .chain([(size, 0)])
        .collect();
    header.set_entry_type(EntryType::GNUSparse);
    // The size field counts only the data stored in the archive.
    header.set_size(map.iter().map(|&(_, len)| len).sum());
    let gnu = header
        .as_gnu_mut()
        .ok_or_else(|| io::Error::other("a GNU header was expected"))?;
    gnu.set_real_size(size);
    for (slot, &(offset, len)) in gnu.sparse.iter_mut().zip(&map) {
        slot.set_offset(offset);
        slot.set_length(len);
    }
    gnu.set_is_extended(map.len() > HEADER_SPARSE_SLOTS);

    let rest = map.get(HEADER_SPARSE_SLOTS..).unwrap_or_default();
    let mut blocks = Vec::new();
    let mut chunks = rest.chunks(EXT_SPARSE_SLOTS).peekable();
    while let Some(chunk) = chunks.next() {
        let mut ext = GnuExtSparseHeader::new();
        for (slot, &(offset, len)) in ext.sparse_mut().iter_mut().zip(chunk) {
            slot.set_offset(offset);
            slot.set_length(len);
        }
        ext.set_is_extended(chunks.peek().is_some());
        blocks.extend_from_slice(ext.as_bytes());
    }
    Ok(blocks)
}

/// Reads the given byte ranges of a file back to back, failing instead of coming up short if
/// the file shrinks meanwhile (a short entry would corrupt the rest of the stream).
struct SegmentReader<'a> {
    file: &'a File,
    segments: Vec<(u64, u64)>,
    next: usize,
    pos: u64,
    failure: Option<io::Error>,
}

impl<'a> SegmentReader<'a> {
    fn new(file: &'a File, segments: Vec<(u64, u64)>) -> Self {
        let pos = segments.first().map_or(0, |&(start, _)| start);
        Self {
            file,
            segments,
            next: 0,
            pos,
            failure: None,
        }
    }

    fn fail(&mut self, err: io::Error) -> io::Error {
        let relay = io::Error::new(err.kind(), err.to_string());
        self.failure = Some(err);
        relay
    }
}

impl Read for SegmentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(&(_, end)) = self.segments.get(self.next) else {
                return Ok(0);
            };
            if self.pos >= end {
                self.next += 1;
                if let Some(&(start, _)) = self.segments.get(self.next) {
                    self.pos = start;
                }
                continue;
            }
            let want = usize::try_from(end - self.pos).map_or(buf.len(), |n| n.min(buf.len()));
            return match self.file.read_at(&mut buf[..want], self.pos) {
                Ok(0) => Err(self.fail(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was being archived",
                ))),
                Ok(n) => {
                    self.pos += n as u64;
                    Ok(n)
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => Err(self.fail(err)),
            };
        }
    }
}

/// Recreates a tree packed by pack_dir under `dest` (which exists and is empty), exactly.
///
/// Entries are created without ever following a symlink: parents must be real directories
/// (missing ones are made with a plain `mkdir`), files are created with `O_EXCL`, and an
/// entry that already exists is an error rather than being replaced. Paths that are absolute,
/// contain `..`, or lead through a symlink are refused with [`ArchiveError::UnsafePath`].
/// Directory owners, modes, xattrs and mtimes, including those of `dest` itself, are applied
/// after all entries exist. The stream is read up to its end-of-archive marker, not to EOF.
pub fn unpack_dir<R: Read>(input: R, dest: &Path) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(input);
    archive.set_overwrite(false);
    let decode_error = |source| ArchiveError::Decode {
        path: dest.to_path_buf(),
        source,
    };
    let mut dirs = Vec::new();
    for entry in archive.entries().map_err(decode_error)? {
        unpack_entry(&mut entry.map_err(decode_error)?, dest, &mut dirs)?;
    }
    // Last, and deepest first: creating entries bumps a directory's mtime, a restrictive mode
    // could lock out what follows, and a default ACL or setgid bit would leak into entries
    // created below it.
    for (path, meta) in dirs.iter().rev() {
        apply_metadata(path, meta, false)?;
    }
    Ok(())
}

/// What the archive says about an entry besides its type, name and content.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: BTreeMap<OsString, Vec<u8>>,
}

fn unpack_entry<R: Read>(
    entry: &mut Entry<'_, R>,
    dest: &Path,
    dirs: &mut Vec<(PathBuf, EntryMeta)>,
) -> Result<(), ArchiveError> {
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

    let Some((leaf, parents)) = components.split_last() else {
        // Only the root's own directory entry may name the destination itself.
        if kind != EntryType::Directory {
            return Err(unsafe_path());
        }
        dirs.push((dest.to_path_buf(), meta));
        return Ok(());
    };
    let abs = resolve_parent(dest, parents, &rel, true)?.join(leaf);
    let create_error = |source| ArchiveError::Create {
        path: abs.clone(),
        source,
    };

    match kind {
        EntryType::Directory => {
            match fs::symlink_metadata(&abs) {
                // Made earlier as the parent of an entry listed before its directory.
                Ok(existing) if existing.is_dir() => {}
                Ok(_) => return Err(create_error(Errno::EEXIST.into())),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    // Private until its real mode is applied at the end.
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&abs)
                        .map_err(create_error)?;
                }
                Err(err) => return Err(create_error(err)),
            }
            dirs.push((abs, meta));
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            // The crate would make a directory of a regular entry whose name ends in '/'.
            if raw_path.ends_with(b"/") {
                return Err(malformed("a file entry whose name ends with '/'"));
            }
            // The crate opens with O_CREAT|O_EXCL (never through a symlink) and seeks over
            // the holes of sparse entries.
            entry.unpack(&abs).map_err(create_error)?;
            apply_metadata(&abs, &meta, false)?;
        }
        EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| malformed("a symlink without a target"))?;
            std::os::unix::fs::symlink(OsStr::from_bytes(&target), &abs).map_err(create_error)?;
            apply_metadata(&abs, &meta, true)?;
        }
        EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| malformed("a hard link without a target"))?;
            let target_components = safe_components(&target).ok_or_else(unsafe_path)?;
            let (target_leaf, target_parents) =
                target_components.split_last().ok_or_else(unsafe_path)?;
            let source = resolve_parent(dest, target_parents, &rel, false)?.join(target_leaf);
            // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked, not followed.
            fs::hard_link(&source, &abs).map_err(create_error)?;
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let (node_type, dev) = if kind == EntryType::Fifo {
                (SFlag::S_IFIFO, 0)
            } else {
                let header = entry.header();
                let number = |field: io::Result<Option<u32>>| match field {
                    Ok(Some(n)) => Ok(u64::from(n)),
                    Ok(None) => Err(malformed("a device entry without device numbers")),
                    Err(source) => Err(ArchiveError::Decode {
                        path: rel.clone(),
                        source,
                    }),
                };
                let major = number(header.device_major())?;
                let minor = number(header.device_minor())?;
                let node_type = if kind == EntryType::Char {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                (node_type, stat::makedev(major, minor))
            };
            stat::mknod(&abs, node_type, Mode::empty(), dev)
                .map_err(|errno| create_error(errno.into()))?;
            apply_metadata(&abs, &meta, false)?;
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

/// The entry's path split into its components, or `None` if it is absolute or has a `..`
/// component. Empty and `.` components are dropped, so the root comes back empty.
fn safe_components(raw: &[u8]) -> Option<Vec<&OsStr>> {
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

/// Checks that every one of `parents` below `dest` is a real directory, creating missing ones
/// if `create`, and returns the joined path. Anything else, a symlink above all, would let an
/// entry land outside `dest`.
fn resolve_parent(
    dest: &Path,
    parents: &[&OsStr],
    rel: &Path,
    create: bool,
) -> Result<PathBuf, ArchiveError> {
    let mut path = dest.to_path_buf();
    for component in parents {
        path.push(component);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(ArchiveError::UnsafePath {
                    path: rel.to_path_buf(),
                })
            }
            Ok(_) => {
                return Err(ArchiveError::Create {
                    path,
                    source: Errno::ENOTDIR.into(),
                })
            }
            Err(err) if create && err.kind() == io::ErrorKind::NotFound => {
                if let Err(source) = fs::DirBuilder::new().mode(0o755).create(&path) {
                    return Err(ArchiveError::Create { path, source });
                }
            }
            Err(source) => return Err(ArchiveError::Create { path, source }),
        }
    }
    Ok(path)
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
    // Undoes the cast in `Packer::append`.
    let mtime = header.mtime().map_err(decode_error)? as i64;

    let mut xattrs = BTreeMap::new();
    if let Some(records) = entry.pax_extensions().map_err(decode_error)? {
        for record in records {
            let record = record.map_err(|_| malformed("a malformed PAX record"))?;
            let key = record.key_bytes();
            if let Some(name) = key.strip_prefix(SCHILY_XATTR.as_bytes()) {
                xattrs.insert(
                    OsString::from_vec(name.to_vec()),
                    record.value_bytes().to_vec(),
                );
            } else if let Some(encoded) = key.strip_prefix(LIBARCHIVE_XATTR.as_bytes()) {
                // Like libarchive's reader, a `%` without two hex digits stands for itself.
                let name = percent_decode(encoded).collect();
                let value = XATTR_VALUE_BASE64
                    .decode(record.value_bytes())
                    .map_err(|err| decode_error(io::Error::new(io::ErrorKind::InvalidData, err)))?;
                xattrs.insert(OsString::from_vec(name), value);
            }
        }
    }
    Ok(EntryMeta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// Owner first (it clears setuid/setgid and file capabilities), then xattrs, then the mode,
/// then the mtime, none of them following a symlink at `path`.
fn apply_metadata(path: &Path, meta: &EntryMeta, is_symlink: bool) -> Result<(), ArchiveError> {
    let metadata_error = |what: &'static str| {
        move |errno: Errno| ArchiveError::Metadata {
            path: path.to_path_buf(),
            what,
            source: errno.into(),
        }
    };
    unistd::fchownat(
        None,
        path,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(metadata_error("owner"))?;
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
        .map_err(metadata_error("mode"))?;
    }
    let mtime = TimeSpec::new(meta.mtime, 0);
    stat::utimensat(None, path, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(metadata_error("mtime"))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::os::unix::net::UnixListener;

    const MIB: u64 = 1 << 20;
    const SPARSE_SIZE: u64 = 64 * MIB;
    const ISLANDS: u64 = 30;
    /// A value with `\n`, `=`, NUL and non-UTF-8 bytes, like overlayfs's binary xattrs.
    const BINARY_XATTR: &[u8] = b"\x00\x0a\xfb\x0a\n=\xff";

    fn require_root() {
        assert!(
            unistd::geteuid().is_root(),
            "this test needs root: it sets owners, trusted.* xattrs and makes device nodes"
        );
    }

    /// A temporary directory on a filesystem that takes xattrs of each of `namespaces`.
    fn xattr_capable_tempdir(namespaces: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for namespace in namespaces {
            let name = format!("{namespace}.probe");
            assert!(
                xattr::set(dir.path(), &name, b"1").is_ok(),
                "the filesystem of {} must support {namespace}.* xattrs for this test",
                dir.path().display()
            );
            xattr::remove(dir.path(), &name).unwrap();
        }
        dir
    }

    fn mknod_at(path: &Path, kind: SFlag, perm: u32, major: u64, minor: u64) {
        stat::mknod(
            path,
            kind,
            Mode::from_bits_truncate(perm),
            stat::makedev(major, minor),
        )
        .unwrap();
        // mknod's mode is filtered through the umask.
        stat::fchmodat(
            None,
            path,
            Mode::from_bits_truncate(perm),
            FchmodatFlags::FollowSymlink,
        )
        .unwrap();
    }

    fn long_component(c: char) -> String {
        std::iter::repeat_n(c, 150).collect()
    }

    /// Every kind of thing an upper dir can hold that an unprivileged user can make: whiteouts
    /// included, since Linux 5.8 lets anyone mknod a 0:0 character device.
    fn build_unprivileged_tree(root: &Path) {
        fs::write(root.join("file.txt"), b"hello\n").unwrap();
        xattr::set(root.join("file.txt"), "user.comment", b"a user xattr").unwrap();
        // Binary values and awkward names take the LIBARCHIVE.xattr form.
        xattr::set(root.join("file.txt"), "user.binary", BINARY_XATTR).unwrap();
        xattr::set(
            root.join("file.txt"),
            OsStr::from_bytes(b"user.we=ird\nna me\xff"),
            b"v",
        )
        .unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::create_dir(root.join("emptydir")).unwrap();
        xattr::set(root.join("emptydir"), "user.on-a-dir", b"d").unwrap();
        symlink("file.txt", root.join("link")).unwrap();
        symlink("/nonexistent/target", root.join("dangling")).unwrap();
        let long_target = format!("../{}/{}", long_component('t'), long_component('u'));
        symlink(&long_target, root.join("longlink")).unwrap();

        let deep = root.join("deep/d1/d2/d3/d4/d5/d6/d7/d8/d9");
        fs::create_dir_all(&deep).unwrap();
        let long_file = deep.join(long_component('n'));
        fs::write(&long_file, b"behind a long path").unwrap();
        // The link entry then needs a GNU long link name.
        fs::hard_link(&long_file, root.join("a/hardlink")).unwrap();
        let odd_dir = root.join(OsStr::from_bytes(b"\xff\xfe-not-utf8"));
        fs::create_dir(&odd_dir).unwrap();
        fs::write(
            odd_dir.join(long_component('z')),
            b"long name below a non-UTF-8 one",
        )
        .unwrap();
        fs::write(root.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1 name").unwrap();

        unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
        mknod_at(&root.join("a/whiteout"), SFlag::S_IFCHR, 0, 0, 0);
        fs::create_dir(root.join("sticky")).unwrap();
        fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();

        // More than 4 + 21 data segments, so two extension blocks, and a trailing hole.
        let sparse = File::create(root.join("sparse")).unwrap();
        sparse.set_len(SPARSE_SIZE).unwrap();
        for i in 0..ISLANDS {
            sparse
                .write_all_at(&[i as u8 + 1; 4096], i * 2 * MIB + 4096)
                .unwrap();
        }
        // Data at offset 0, a hole, and an unaligned data tail.
        let tail = File::create(root.join("sparse-tail")).unwrap();
        tail.write_all_at(b"head", 0).unwrap();
        tail.write_all_at(&[7u8; 1000], 10 * MIB + 123).unwrap();
        // Nothing but a hole.
        File::create(root.join("all-hole"))
            .unwrap()
            .set_len(3 * MIB)
            .unwrap();

        UnixListener::bind(root.join("socket")).unwrap();
        fs::set_permissions(root, fs::Permissions::from_mode(0o751)).unwrap();
    }

    /// What only root can add to [`build_unprivileged_tree`]: foreign owners, setuid and
    /// setgid on them, trusted.* xattrs (overlayfs's own, an opaque dir among them) and
    /// device nodes other than whiteouts.
    fn add_privileged_entries(root: &Path) {
        xattr::set(
            root.join("file.txt"),
            "trusted.overlay.origin",
            BINARY_XATTR,
        )
        .unwrap();
        xattr::set(root.join("link"), "trusted.overlay.test", b"on a symlink").unwrap();
        mknod_at(&root.join("null"), SFlag::S_IFCHR, 0o666, 1, 3);
        mknod_at(&root.join("loop9"), SFlag::S_IFBLK, 0o660, 7, 9);
        fs::create_dir(root.join("opaque")).unwrap();
        fs::write(root.join("opaque/inside"), b"x").unwrap();
        xattr::set(root.join("opaque"), "trusted.overlay.opaque", b"y").unwrap();

        let suid = root.join("suid");
        fs::write(&suid, b"#!/bin/sh\n").unwrap();
        unistd::chown(&suid, Some(Uid::from_raw(1234)), Some(Gid::from_raw(5678))).unwrap();
        fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
        fs::create_dir(root.join("sgid")).unwrap();
        unistd::chown(&root.join("sgid"), None, Some(Gid::from_raw(5678))).unwrap();
        fs::set_permissions(root.join("sgid"), fs::Permissions::from_mode(0o2750)).unwrap();
        fs::write(root.join("sgid/child"), b"c").unwrap();

        unistd::chown(root, Some(Uid::from_raw(100)), Some(Gid::from_raw(200))).unwrap();
        xattr::set(root, "trusted.overlay.impure", b"y").unwrap();
    }

    /// Gives every entry a distinct old mtime; last, since building the tree bumps them.
    fn set_distinct_mtimes(root: &Path) {
        let mut all = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(path) = stack.pop() {
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                for entry in fs::read_dir(&path).unwrap() {
                    stack.push(entry.unwrap().path());
                }
            }
            all.push(path);
        }
        for (i, path) in all.iter().enumerate() {
            let time = TimeSpec::new(1_500_000_000 + i as i64 * 1000, 0);
            stat::utimensat(None, path, &time, &time, UtimensatFlags::NoFollowSymlink).unwrap();
        }
    }

    #[derive(Debug, PartialEq)]
    struct Node {
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: i64,
        rdev: u64,
        size: Option<u64>,
        content: Option<blake3::Hash>,
        target: Option<PathBuf>,
        xattrs: Vec<(OsString, Vec<u8>)>,
    }

    /// Everything about a tree that unpacking must preserve, keyed by relative path.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
        let mut nodes = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let abs = root.join(&rel);
            let meta = fs::symlink_metadata(&abs).unwrap();
            let file_type = meta.file_type();
            if file_type.is_dir() {
                for entry in fs::read_dir(&abs).unwrap() {
                    stack.push(rel.join(entry.unwrap().file_name()));
                }
            }
            let content = file_type.is_file().then(|| {
                let mut hasher = blake3::Hasher::new();
                hasher.update_reader(File::open(&abs).unwrap()).unwrap();
                hasher.finalize()
            });
            let is_device = file_type.is_char_device() || file_type.is_block_device();
            nodes.insert(
                rel,
                Node {
                    mode: meta.mode(),
                    uid: meta.uid(),
                    gid: meta.gid(),
                    mtime: meta.mtime(),
                    rdev: if is_device { meta.rdev() } else { 0 },
                    size: file_type.is_file().then_some(meta.len()),
                    content,
                    target: file_type.is_symlink().then(|| fs::read_link(&abs).unwrap()),
                    xattrs: read_xattrs(&abs).unwrap(),
                },
            );
        }
        nodes
    }

    fn pack(dir: &Path) -> Vec<u8> {
        pack_dir(dir, Vec::new()).unwrap()
    }

    /// Packs `src` and unpacks it into a fresh directory, checks that everything but the
    /// socket came back identical, and returns the archive, the copy and its snapshot.
    fn round_trip(
        src: &Path,
        namespaces: &[&str],
    ) -> (Vec<u8>, tempfile::TempDir, BTreeMap<PathBuf, Node>) {
        let archive = pack(src);
        let dst = xattr_capable_tempdir(namespaces);
        unpack_dir(archive.as_slice(), dst.path()).unwrap();

        let mut expected = snapshot(src);
        assert!(expected.remove(Path::new("socket")).is_some());
        let actual = snapshot(dst.path());
        assert_eq!(
            expected.keys().collect::<Vec<_>>(),
            actual.keys().collect::<Vec<_>>()
        );
        for (path, node) in &expected {
            assert_eq!(Some(node), actual.get(path), "{}", path.display());
        }
        (archive, dst, actual)
    }

    #[test]
    fn round_trip_without_root() {
        let src = xattr_capable_tempdir(&["user"]);
        build_unprivileged_tree(src.path());
        set_distinct_mtimes(src.path());
        let (archive, dst, actual) = round_trip(src.path(), &["user"]);

        // Spot checks that the comparison covers what matters.
        assert_eq!(actual[Path::new("")].mode & 0o7777, 0o751);
        assert_eq!(actual[Path::new("sticky")].mode & 0o7777, 0o1777);
        let whiteout = &actual[Path::new("a/whiteout")];
        assert_eq!(whiteout.mode & libc::S_IFMT, libc::S_IFCHR);
        assert_eq!(whiteout.rdev, 0);
        assert_eq!(actual[Path::new("fifo")].mode & libc::S_IFMT, libc::S_IFIFO);
        let xattrs = &actual[Path::new("file.txt")].xattrs;
        assert_eq!(xattrs.len(), 3);
        assert!(xattrs.contains(&(OsString::from("user.binary"), BINARY_XATTR.to_vec())));
        assert!(xattrs
            .iter()
            .any(|(name, _)| name.as_bytes() == b"user.we=ird\nna me\xff"));
        assert_eq!(actual[Path::new("emptydir")].xattrs.len(), 1);
        assert_eq!(
            actual[Path::new("dangling")].target.as_deref(),
            Some(Path::new("/nonexistent/target"))
        );
        assert!(actual.contains_key(Path::new(OsStr::from_bytes(b"caf\xe9"))));

        let long_file = dst
            .path()
            .join("deep/d1/d2/d3/d4/d5/d6/d7/d8/d9")
            .join(long_component('n'));
        let (first, second) = (
            fs::symlink_metadata(long_file).unwrap(),
            fs::symlink_metadata(dst.path().join("a/hardlink")).unwrap(),
        );
        assert_eq!((first.dev(), first.ino()), (second.dev(), second.ino()));
        assert_eq!(first.nlink(), 2);

        for (name, max_allocated) in [
            ("sparse", ISLANDS * 8192),
            ("sparse-tail", 64 * 1024),
            ("all-hole", 0),
        ] {
            let src_blocks = fs::metadata(src.path().join(name)).unwrap().blocks() * 512;
            let dst_blocks = fs::metadata(dst.path().join(name)).unwrap().blocks() * 512;
            assert!(src_blocks <= max_allocated, "{name}: source not sparse");
            assert!(
                dst_blocks <= max_allocated,
                "{name}: {dst_blocks} bytes allocated after unpacking"
            );
        }
        // Only the data islands are stored, not 64 MiB of zeros.
        assert!((archive.len() as u64) < 2 * MIB, "{} bytes", archive.len());
    }

    #[test]
    fn round_trip_preserves_everything() {
        require_root();
        let src = xattr_capable_tempdir(&["trusted", "user"]);
        build_unprivileged_tree(src.path());
        add_privileged_entries(src.path());
        set_distinct_mtimes(src.path());
        let (_, _, actual) = round_trip(src.path(), &["trusted", "user"]);

        // Spot checks that the comparison covers what matters.
        let root = &actual[Path::new("")];
        assert_eq!((root.mode & 0o7777, root.uid, root.gid), (0o751, 100, 200));
        let suid = &actual[Path::new("suid")];
        assert_eq!(
            (suid.mode & 0o7777, suid.uid, suid.gid),
            (0o4755, 1234, 5678)
        );
        let sgid = &actual[Path::new("sgid")];
        assert_eq!((sgid.mode & 0o7777, sgid.gid), (0o2750, 5678));
        assert_eq!(actual[Path::new("null")].rdev, stat::makedev(1, 3));
        let loop9 = &actual[Path::new("loop9")];
        assert_eq!(loop9.mode & libc::S_IFMT, libc::S_IFBLK);
        assert_eq!(loop9.rdev, stat::makedev(7, 9));
        assert_eq!(
            actual[Path::new("opaque")].xattrs,
            vec![(OsString::from("trusted.overlay.opaque"), b"y".to_vec())]
        );
        assert_eq!(actual[Path::new("link")].xattrs.len(), 1);
        let xattrs = &actual[Path::new("file.txt")].xattrs;
        assert_eq!(xattrs.len(), 4);
        assert!(xattrs.contains(&(
            OsString::from("trusted.overlay.origin"),
            BINARY_XATTR.to_vec()
        )));
    }

    #[test]
    fn packing_is_deterministic() {
        let src = xattr_capable_tempdir(&["user"]);
        build_unprivileged_tree(src.path());
        assert!(pack(src.path()) == pack(src.path()));
    }

    #[test]
    fn sparse_entries_use_gnu_extension_blocks() {
        let src = xattr_capable_tempdir(&["user"]);
        build_unprivileged_tree(src.path());
        let archive = pack(src.path());
        let mut reader = tar::Archive::new(archive.as_slice());
        let entry = reader
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .find(|e| e.path_bytes().as_ref() == b"sparse")
            .unwrap();
        let header = entry.header();
        assert_eq!(header.entry_type(), EntryType::GNUSparse);
        assert!(header.as_gnu().unwrap().is_extended());
        assert_eq!(header.size().unwrap(), SPARSE_SIZE);
        assert_eq!(header.entry_size().unwrap(), ISLANDS * 4096);
    }

    #[test]
    fn awkward_xattrs_travel_in_libarchive_form() {
        let src = xattr_capable_tempdir(&["user"]);
        let file = src.path().join("f");
        fs::write(&file, b"").unwrap();
        xattr::set(&file, OsStr::from_bytes(b"user.a=b c%\n\xff"), b"foob").unwrap();
        let archive = pack(src.path());
        let mut reader = tar::Archive::new(archive.as_slice());
        let mut entry = reader
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .find(|e| e.path_bytes().as_ref() == b"f")
            .unwrap();
        let records: Vec<(Vec<u8>, Vec<u8>)> = entry
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                (r.key_bytes().to_vec(), r.value_bytes().to_vec())
            })
            .collect();
        // Byte for byte what bsdtar writes: escaped name, unpadded base64.
        assert_eq!(
            records,
            vec![(
                b"LIBARCHIVE.xattr.user.a%3Db%20c%25%0A%FF".to_vec(),
                b"Zm9vYg".to_vec()
            )]
        );

        // Padded values, which libarchive also reads, come back the same; broken ones are
        // refused with the decoder's reason.
        let dst = xattr_capable_tempdir(&["user"]);
        let padded = single_xattr_archive(b"g", "LIBARCHIVE.xattr.user.padded", b"Zm9vYg==");
        unpack_dir(padded.as_slice(), dst.path()).unwrap();
        assert_eq!(
            xattr::get(dst.path().join("g"), "user.padded").unwrap(),
            Some(b"foob".to_vec())
        );
        let broken = single_xattr_archive(b"h", "LIBARCHIVE.xattr.user.broken", b"Zm9vY");
        match unpack_dir(broken.as_slice(), dst.path()) {
            Err(ArchiveError::Decode { path, source }) => {
                assert_eq!(path, Path::new("h"));
                assert_eq!(source.kind(), io::ErrorKind::InvalidData);
            }
            other => panic!("expected Decode, got {other:?}"),
        }
    }

    /// An archive holding one empty file with one PAX record.
    fn single_xattr_archive(name: &[u8], key: &str, value: &[u8]) -> Vec<u8> {
        let mut builder = Builder::new(Vec::new());
        builder.append_pax_extensions([(key, value)]).unwrap();
        let header = raw_header(name, EntryType::Regular, b"", 0);
        builder.append(&header, io::empty()).unwrap();
        builder.into_inner().unwrap()
    }

    /// A header with `name` and link `target` written verbatim, owned by the caller so that
    /// unpacking it needs no privileges.
    fn raw_header(name: &[u8], kind: EntryType, target: &[u8], size: u64) -> Header {
        let mut header = Header::new_gnu();
        fill_name_field(&mut header.as_old_mut().name, name);
        fill_name_field(&mut header.as_old_mut().linkname, target);
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_uid(u64::from(unistd::getuid().as_raw()));
        header.set_gid(u64::from(unistd::getgid().as_raw()));
        header.set_mtime(0);
        header.set_size(size);
        header.set_cksum();
        header
    }

    /// Name, type and link target of an entry.
    type RawEntry<'a> = (&'a [u8], EntryType, &'a [u8]);

    /// An archive whose names and link targets are written verbatim, as a hostile sender
    /// could.
    fn raw_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
        let mut builder = Builder::new(Vec::new());
        for &(name, kind, target) in entries {
            let data: &[u8] = if kind == EntryType::Regular {
                b"evil"
            } else {
                b""
            };
            let header = raw_header(name, kind, target, data.len() as u64);
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn assert_refused(archive: &[u8], dest: &Path) {
        match unpack_dir(archive, dest) {
            Err(ArchiveError::UnsafePath { .. }) => {}
            other => panic!("expected UnsafePath, got {other:?}"),
        }
    }

    fn is_empty_dir(dir: &Path) -> bool {
        fs::read_dir(dir).unwrap().next().is_none()
    }

    #[test]
    fn refuses_parent_and_absolute_paths() {
        let scratch = tempfile::tempdir().unwrap();
        let dest = scratch.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let outside = scratch.path().join("outside");
        fs::create_dir(&outside).unwrap();

        assert_refused(
            &raw_archive(&[(b"../evil", EntryType::Regular, b"")]),
            &dest,
        );
        assert_refused(
            &raw_archive(&[(b"a/../../evil", EntryType::Regular, b"")]),
            &dest,
        );
        let absolute = outside.join("evil");
        assert_refused(
            &raw_archive(&[(absolute.as_os_str().as_bytes(), EntryType::Regular, b"")]),
            &dest,
        );
        assert_refused(
            &raw_archive(&[(b"h", EntryType::Link, b"../outside/x")]),
            &dest,
        );
        assert!(!scratch.path().join("evil").exists());
        assert!(is_empty_dir(&outside));
        assert!(is_empty_dir(&dest));
    }

    #[test]
    fn refuses_to_write_through_an_archived_symlink() {
        let scratch = tempfile::tempdir().unwrap();
        let outside = scratch.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"untouched").unwrap();
        let target = outside.as_os_str().as_bytes();

        let cases: [&[RawEntry<'_>]; 3] = [
            &[
                (b"a", EntryType::Symlink, target),
                (b"a/x", EntryType::Regular, b""),
            ],
            &[
                (b"a", EntryType::Symlink, target),
                (b"a/sub/", EntryType::Directory, b""),
            ],
            &[
                (b"a", EntryType::Symlink, target),
                (b"h", EntryType::Link, b"a/victim"),
            ],
        ];
        for (i, entries) in cases.into_iter().enumerate() {
            let dest = scratch.path().join(format!("dest{i}"));
            fs::create_dir(&dest).unwrap();
            assert_refused(&raw_archive(entries), &dest);
            assert_eq!(
                fs::read_dir(&outside).unwrap().count(),
                1,
                "case {i} wrote outside"
            );
        }
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"untouched");
        assert_eq!(fs::metadata(outside.join("victim")).unwrap().nlink(), 1);
    }

    #[test]
    fn refuses_unsupported_entry_types() {
        let scratch = tempfile::tempdir().unwrap();
        let archive = raw_archive(&[(b"volume", EntryType::new(b'V'), b"")]);
        match unpack_dir(archive.as_slice(), scratch.path()) {
            Err(ArchiveError::Unsupported { kind: 'V', .. }) => {}
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
}
