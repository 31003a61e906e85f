//! One archive entry built from the tree, with everything it will write and its length,
//! so that measuring a tree and packing it cannot disagree.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat;
use tar::{EntryType, Header};

use super::{sparse, xattrs, ArchiveError, REMOVE_KEY, REMOVE_VALUE};
use crate::rootfs::snapshot::{EntryKind, EntryStat};

/// Size of the name and link-name fields of a tar header.
pub(super) const NAME_FIELD_LEN: usize = 100;
/// A tar block: every header, and the unit all data is padded to.
pub(super) const BLOCK: u64 = 512;
/// The two zero blocks that end an archive.
pub(super) const END_OF_ARCHIVE: u64 = 2 * BLOCK;

/// What a file replaced by another inode between its stat and its opening means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Replaced {
    /// Packing: no stream could describe it.
    Fail,
    /// Measuring: the replacement is measured.
    Measure,
}

/// Builds entries from the tree, the same way whether they are then written or only
/// measured, so that a measurement is the length of what packing writes.
pub(super) struct Preparer {
    replaced: Replaced,
    /// Archive name of the first path archived for each multiply-linked inode.
    first_names: HashMap<(u64, u64), Vec<u8>>,
}

/// One entry, ready to be written: its headers, extension records and content.
pub(super) struct Prepared {
    pub(super) rel: PathBuf,
    pub(super) name: Vec<u8>,
    pub(super) header: Header,
    pub(super) link_target: Option<Vec<u8>>,
    /// The PAX extended header's data; empty for none.
    pub(super) pax: Vec<u8>,
    pub(super) content: Content,
    /// For the first name of a multiply-linked inode: the inode, so that later names link to
    /// this one once it is in the archive.
    pub(super) links_as: Option<(u64, u64)>,
    /// Bytes the entry takes in the stream, extension entries and padding included.
    pub(super) len: u64,
}

pub(super) enum Content {
    Empty,
    File {
        abs: PathBuf,
        file: fs::File,
        segments: Vec<(u64, u64)>,
        /// The sparse map's extension blocks, written before the data.
        sparse_map: Vec<u8>,
    },
}

impl Preparer {
    pub(super) fn new(replaced: Replaced) -> Self {
        Self {
            replaced,
            first_names: HashMap::new(),
        }
    }

    /// Records that `entry` is in the archive, for the hard links that follow it.
    pub(super) fn accept(&mut self, entry: &Prepared) {
        if let Some(inode) = entry.links_as {
            self.first_names.insert(inode, entry.name.clone());
        }
    }

    /// The entry at `abs` as `stat`, taken before, describes it; `None` if it was deleted
    /// before anything of it was read.
    pub(super) fn prepare(
        &self,
        abs: &Path,
        rel: &Path,
        stat: &EntryStat,
    ) -> Result<Option<Prepared>, ArchiveError> {
        let name = archive_name(rel, stat.kind == EntryKind::Dir);
        let mut header = Header::new_gnu();
        header.set_mode(stat.mode);
        header.set_uid(u64::from(stat.uid));
        header.set_gid(u64::from(stat.gid));
        // A pre-1970 mtime wraps to a huge u64, which the crate stores in base-256 and reads
        // back to the same bits, so the cast round-trips.
        header.set_mtime(stat.mtime.secs as u64);
        header.set_size(0);
        let mut entry = Prepared {
            rel: rel.to_path_buf(),
            name,
            header,
            link_target: None,
            pax: Vec::new(),
            content: Content::Empty,
            links_as: None,
            len: 0,
        };

        let inode = (stat.dev, stat.ino);
        let linkable = stat.kind != EntryKind::Dir && stat.nlink > 1;
        if let Some(first) = self.first_names.get(&inode).filter(|_| linkable) {
            entry.header.set_entry_type(EntryType::Link);
            entry.link_target = Some(first.clone());
            return Ok(Some(entry.measured()));
        }
        entry.links_as = linkable.then_some(inode);

        match xattrs::read(abs) {
            Ok(xattrs) => entry.pax = pax_data(&xattrs::pax_records(&xattrs)),
            Err(err) => return vanished_or(abs, err),
        }
        entry.header.set_entry_type(entry_type(stat.kind));
        match stat.kind {
            EntryKind::File => {
                let Some(content) = self.open_file(abs, rel, &mut entry.header, stat)? else {
                    return Ok(None);
                };
                entry.content = content;
            }
            EntryKind::Symlink => match fs::read_link(abs) {
                Ok(link) => entry.link_target = Some(link.into_os_string().into_vec()),
                Err(err) => return vanished_or(abs, err),
            },
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                // Linux majors have 12 bits and minors 20, so both fit the u32 (and the
                // 7-digit octal header fields).
                entry
                    .header
                    .set_device_major(stat::major(stat.rdev) as u32)
                    .and_then(|()| entry.header.set_device_minor(stat::minor(stat.rdev) as u32))
                    .map_err(|source| write_error(rel, source))?;
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
        Ok(Some(entry.measured()))
    }

    /// Opens a regular file, checks it is the one statted and sets the header's size and
    /// sparse map; `None` if it is gone.
    fn open_file(
        &self,
        abs: &Path,
        rel: &Path,
        header: &mut Header,
        stat: &EntryStat,
    ) -> Result<Option<Content>, ArchiveError> {
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
        let replaced = (opened.dev(), opened.ino()) != (stat.dev, stat.ino);
        if replaced && (self.replaced == Replaced::Fail || !opened.is_file()) {
            return Err(read_error(
                abs,
                io::Error::other("replaced while it was being archived"),
            ));
        }
        let size = opened.len();
        let (segments, sparse_map) = match sparse::data_segments(&file, &opened) {
            Ok(Some(segments)) => {
                let map = sparse::encode_map(header, &segments, size)
                    .map_err(|source| write_error(rel, source))?;
                (segments, map)
            }
            Ok(None) => {
                header.set_size(size);
                (vec![(0, size)], Vec::new())
            }
            Err(source) => return Err(read_error(abs, source)),
        };
        Ok(Some(Content::File {
            abs: abs.to_path_buf(),
            file,
            segments,
            sparse_map,
        }))
    }
}

impl Prepared {
    /// Sets `len` from what the entry holds, as [`super::pack`] writes it.
    fn measured(mut self) -> Self {
        let data = match &self.content {
            Content::Empty => 0,
            // The header's size field counts the stored data; the map blocks come first.
            Content::File {
                segments,
                sparse_map,
                ..
            } => sparse_map.len() as u64 + segments.iter().map(|(s, e)| e - s).sum::<u64>(),
        };
        let mut len = BLOCK + padded(data);
        if !self.pax.is_empty() {
            len += BLOCK + padded(self.pax.len() as u64);
        }
        for long in [Some(&self.name), self.link_target.as_ref()]
            .into_iter()
            .flatten()
        {
            if long.len() > NAME_FIELD_LEN {
                len += BLOCK + padded(long.len() as u64 + 1);
            }
        }
        self.len = len;
        self
    }
}

/// The removal entry for `rel` (see the [module docs](super)).
pub(super) fn removal(rel: &Path) -> Prepared {
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_mode(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(0);
    Prepared {
        rel: rel.to_path_buf(),
        name: archive_name(rel, false),
        header,
        link_target: None,
        pax: pax_data(&[(REMOVE_KEY.to_owned(), REMOVE_VALUE.to_vec())]),
        content: Content::Empty,
        links_as: None,
        len: 0,
    }
    .measured()
}

/// PAX records as the data of an extended header: `<length> <key>=<value>\n` each, the
/// length counting itself.
fn pax_data(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        // The length of "<length> " counts its own digits: grow the guess until it fits.
        let rest = key.len() + value.len() + 3;
        let mut digits = 1;
        while (rest + digits).to_string().len() > digits {
            digits += 1;
        }
        data.extend_from_slice(format!("{} {key}=", rest + digits).as_bytes());
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    data
}

/// `len` rounded up to whole tar blocks.
fn padded(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK
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
fn vanished_or<T>(abs: &Path, err: io::Error) -> Result<Option<T>, ArchiveError> {
    if err.kind() == io::ErrorKind::NotFound {
        Ok(None)
    } else {
        Err(read_error(abs, err))
    }
}

pub(super) fn read_error(path: &Path, source: io::Error) -> ArchiveError {
    ArchiveError::Read {
        path: path.to_path_buf(),
        source,
    }
}

pub(super) fn write_error(rel: &Path, source: io::Error) -> ArchiveError {
    ArchiveError::Write {
        path: rel.to_path_buf(),
        source,
    }
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
