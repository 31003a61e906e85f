//! Bounds on what an archive from the wire can make the unpacker hold in memory, checked on
//! the stream itself, header by header, before the `tar` crate sees it.
//!
//! The crate reads a GNU long name (`L`, `K`) or a PAX extended header (`x`) whole into a
//! `Vec` of the size its header states, and keeps a sparse entry's whole map. [`Guarded`]
//! sits between the stream and the crate, reads every 512-byte header as it goes by, and
//! refuses one whose extension data is over its limit before the crate reads any of it; it
//! also counts entries and metadata per archive. It frames the stream the way the crate
//! does (a header, then its data padded to whole blocks, sparse extension blocks after a
//! sparse header), and PAX records may only be the ones the packer writes (xattrs and the
//! removal marker), so that no `size` record can move an entry's end where the guard does
//! not expect it: the guard and the crate always agree on where the next header starts.

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

use tar::{EntryType, GnuExtSparseHeader, Header, PaxExtensions};

use super::entry::BLOCK;
use super::{ArchiveError, REMOVE_KEY};

/// What one archive may hold and make the unpacker hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// Longest GNU long name or long link name, its NUL included: `PATH_MAX`, since longer
    /// paths cannot be created anyway.
    pub long_name: u64,
    /// Largest PAX extended header, which carries one entry's xattrs.
    pub pax_header: u64,
    /// Most GNU sparse extension blocks after one header (21 map slots each).
    pub sparse_blocks: u64,
    /// Most entries in one archive, extension headers not counted.
    pub entries: u64,
    /// Most bytes of long names, PAX headers and sparse maps in one archive.
    pub metadata: u64,
    /// Most bytes the unpacker keeps until the end for directories (path, owner, mode,
    /// xattrs), whose metadata it applies last.
    pub retained: u64,
}

impl Default for ArchiveLimits {
    /// Far above what a container's rootfs needs, far below what would strain the daemon:
    /// it unpacks many streams at once and these are held per stream.
    fn default() -> Self {
        Self {
            long_name: libc::PATH_MAX as u64,
            // Four xattr values of the kernel's maximum (64 KiB) in base64.
            pax_header: 384 << 10,
            // 10 756 data ranges; the packer merges holes to stay within them.
            sparse_blocks: MAX_SPARSE_BLOCKS,
            entries: 4 << 20,
            metadata: 256 << 20,
            retained: 128 << 20,
        }
    }
}

/// The default limit on sparse extension blocks, which the packer also keeps to.
pub(super) const MAX_SPARSE_BLOCKS: u64 = 512;

/// What is wrong with a header the guard refused.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("its {what} of {size} bytes is over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("the archive holds more than the limit of {limit} {what}")]
    TooMany { what: &'static str, limit: u64 },
    #[error("its PAX record {key:?} is not one this format writes")]
    PaxKey { key: String },
    #[error("its PAX header is malformed")]
    PaxMalformed,
    #[error("it {0}")]
    Header(&'static str),
}

/// Where the stream is, as the guard frames it.
#[derive(Debug, Clone, Copy)]
enum State {
    /// The next block is a header.
    Header,
    /// The next block is a sparse extension block; `data` bytes of the entry follow the
    /// last one.
    SparseBlocks { seen: u64, data: u64 },
    /// This many bytes of data and padding before the next header.
    Data(u64),
    /// Past the end-of-archive marker, or a truncated stream: nothing more is framed (the
    /// crate stops at the marker, and fails on a truncated stream).
    Ended,
}

/// A long name or PAX header's data, to be read whole and kept.
struct Extension {
    size: u64,
    pax: bool,
}

/// A reader that hands the archive on only once each header in it has passed the limits.
pub(super) struct Guarded<R> {
    inner: R,
    limits: ArchiveLimits,
    state: State,
    /// Bytes read and inspected, not yet handed on.
    pending: Vec<u8>,
    served: usize,
    /// Offset in the stream of the next byte read from `inner`.
    offset: u64,
    entries: u64,
    metadata: u64,
    /// The typed reason for the last refusal; the crate only passes on an `io::Error`.
    refusal: Rc<RefCell<Option<ArchiveError>>>,
}

impl<R: Read> Guarded<R> {
    /// The guard, and where the reason for a refusal will be left.
    pub(super) fn new(
        inner: R,
        limits: ArchiveLimits,
    ) -> (Self, Rc<RefCell<Option<ArchiveError>>>) {
        let refusal = Rc::new(RefCell::new(None));
        let guard = Self {
            inner,
            limits,
            state: State::Header,
            pending: Vec::with_capacity(BLOCK as usize),
            served: 0,
            offset: 0,
            entries: 0,
            metadata: 0,
            refusal: refusal.clone(),
        };
        (guard, refusal)
    }

    /// Reads up to `len` more bytes into `pending`; returns how many came before the end.
    fn fill(&mut self, len: u64) -> io::Result<u64> {
        let mut got = 0;
        let mut chunk = [0u8; 8192];
        while got < len {
            let want = usize::try_from(len - got).map_or(chunk.len(), |n| n.min(chunk.len()));
            match self.inner.read(&mut chunk[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    got += n as u64;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        self.offset += got;
        Ok(got)
    }

    /// Reads and inspects the next block and, for a long name or PAX header, its data.
    fn next_block(&mut self) -> io::Result<()> {
        self.pending.clear();
        self.served = 0;
        let at = self.offset;
        if self.fill(BLOCK)? < BLOCK {
            // The crate reports the truncation.
            self.state = State::Ended;
            return Ok(());
        }
        let inspected = match self.state {
            State::SparseBlocks { seen, data } => self.sparse_block(seen, data).map(|()| None),
            _ => self.header(),
        };
        let Some(extension) = inspected.map_err(|violation| self.refuse(at, violation))? else {
            return Ok(());
        };
        let padded = extension.size.next_multiple_of(BLOCK);
        if self.fill(padded)? < padded {
            self.state = State::Ended;
            return Ok(());
        }
        if extension.pax {
            let start = BLOCK as usize;
            let data = &self.pending[start..start + extension.size as usize];
            check_pax(data).map_err(|violation| self.refuse(at, violation))?;
        }
        Ok(())
    }

    /// Keeps the typed reason and gives the crate an error to stop on.
    fn refuse(&self, offset: u64, violation: Violation) -> io::Error {
        let message = format!("the archive header at byte {offset}: {violation}");
        *self.refusal.borrow_mut() = Some(ArchiveError::Bounds { offset, violation });
        io::Error::new(io::ErrorKind::InvalidData, message)
    }

    /// Checks a header and sets the state for what follows it; a long name or PAX header's
    /// data is to be read and kept, within its limit.
    fn header(&mut self) -> Result<Option<Extension>, Violation> {
        let mut block = [0u8; BLOCK as usize];
        block.copy_from_slice(&self.pending[..BLOCK as usize]);
        if block.iter().all(|&b| b == 0) {
            self.state = State::Ended;
            return Ok(None);
        }
        let header = Header::from_byte_slice(&block);
        // The crate's own sum: unsigned bytes, the checksum field counted as spaces.
        let sum = block[..148]
            .iter()
            .chain(&block[156..])
            .map(|&b| u32::from(b))
            .sum::<u32>()
            + 8 * 32;
        if header.cksum().ok() != Some(sum) {
            return Err(Violation::Header("has a checksum that does not match"));
        }
        if header.as_gnu().is_none() && header.as_ustar().is_none() {
            return Err(Violation::Header("is neither a GNU nor a ustar header"));
        }
        let size = header
            .entry_size()
            .map_err(|_| Violation::Header("has a size field that is not a number"))?;
        let padded = size
            .checked_next_multiple_of(BLOCK)
            .ok_or(Violation::Header("has a size beyond any stream"))?;
        let kind = header.entry_type();
        if matches!(
            kind,
            EntryType::GNULongName | EntryType::GNULongLink | EntryType::XHeader
        ) {
            let (what, limit) = if kind == EntryType::XHeader {
                ("PAX header", self.limits.pax_header)
            } else {
                ("long name", self.limits.long_name)
            };
            if size > limit {
                return Err(Violation::TooLarge { what, size, limit });
            }
            self.add_metadata(size)?;
            self.state = State::Header;
            return Ok(Some(Extension {
                size,
                pax: kind == EntryType::XHeader,
            }));
        }
        self.entries += 1;
        if self.entries > self.limits.entries {
            return Err(Violation::TooMany {
                what: "entries",
                limit: self.limits.entries,
            });
        }
        let extended =
            kind == EntryType::GNUSparse && header.as_gnu().is_some_and(|gnu| gnu.is_extended());
        self.state = if extended {
            State::SparseBlocks {
                seen: 0,
                data: padded,
            }
        } else {
            State::Data(padded)
        };
        Ok(None)
    }

    fn sparse_block(&mut self, seen: u64, data: u64) -> Result<(), Violation> {
        let seen = seen + 1;
        if seen > self.limits.sparse_blocks {
            return Err(Violation::TooLarge {
                what: "sparse map",
                size: seen * BLOCK,
                limit: self.limits.sparse_blocks * BLOCK,
            });
        }
        self.add_metadata(BLOCK)?;
        let mut ext = GnuExtSparseHeader::new();
        ext.as_mut_bytes()
            .copy_from_slice(&self.pending[..BLOCK as usize]);
        self.state = if ext.is_extended() {
            State::SparseBlocks { seen, data }
        } else {
            State::Data(data)
        };
        Ok(())
    }

    fn add_metadata(&mut self, bytes: u64) -> Result<(), Violation> {
        self.metadata = self.metadata.saturating_add(bytes);
        if self.metadata > self.limits.metadata {
            return Err(Violation::TooMany {
                what: "bytes of long names, PAX headers and sparse maps",
                limit: self.limits.metadata,
            });
        }
        Ok(())
    }
}

/// Only what the packer writes: xattrs in either form, and the removal marker. Anything
/// else could be a record the crate acts on (`size`, `path`, `uid`, ...).
fn check_pax(data: &[u8]) -> Result<(), Violation> {
    for record in PaxExtensions::new(data) {
        let key = record.map_err(|_| Violation::PaxMalformed)?.key_bytes();
        let allowed = key.starts_with(super::xattrs::SCHILY_XATTR.as_bytes())
            || key.starts_with(super::xattrs::LIBARCHIVE_XATTR.as_bytes())
            || key == REMOVE_KEY.as_bytes();
        if !allowed {
            return Err(Violation::PaxKey {
                key: String::from_utf8_lossy(key).chars().take(64).collect(),
            });
        }
    }
    Ok(())
}

impl<R: Read> Read for Guarded<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.served < self.pending.len() {
                let n = out.len().min(self.pending.len() - self.served);
                out[..n].copy_from_slice(&self.pending[self.served..self.served + n]);
                self.served += n;
                return Ok(n);
            }
            match self.state {
                State::Ended => return self.inner.read(out),
                State::Data(0) => self.state = State::Header,
                State::Data(left) => {
                    let want = usize::try_from(left).map_or(out.len(), |n| n.min(out.len()));
                    let n = self.inner.read(&mut out[..want])?;
                    self.offset += n as u64;
                    self.state = if n == 0 {
                        State::Ended
                    } else {
                        State::Data(left - n as u64)
                    };
                    return Ok(n);
                }
                State::Header | State::SparseBlocks { .. } => {
                    self.next_block()?;
                    if self.pending.is_empty() {
                        return Ok(0);
                    }
                }
            }
        }
    }
}
