//! Files with holes as old-GNU sparse entries: the data map lives in the header's four slots
//! plus as many 21-slot extension blocks as needed, and only the data is stored.
//!
//! The `tar` crate (0.4.46) writes this format too, but only inside `Builder::append_file`
//! and `append_path`, which cannot serve here:
//!
//! * they name the entry through `Header::set_path`, which normalises the name and refuses
//!   a long one whose first 100 bytes are not valid UTF-8 from the start;
//! * they fill the header from their own `fstat` and then copy the file with `io::copy`:
//!   to its current end when it has no holes, or a `take` of each data range when it has.
//!   A file that grows or shrinks meanwhile, as files of a running container do while its
//!   base archive is packed, leaves data that does not match the size in the header, which
//!   corrupts every entry after it instead of failing.
//!
//! So the map is built here, from the ranges [`data_segments`] finds, and the content is
//! read by [`SegmentReader`], which stops at the recorded ranges and fails if they come up
//! short.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use nix::errno::Errno;
use nix::unistd::{self, Whence};
use tar::{EntryType, GnuExtSparseHeader, Header};

use super::limits::MAX_SPARSE_BLOCKS;

/// Sparse map slots in the main GNU header; the rest go to extension blocks.
const HEADER_SPARSE_SLOTS: usize = 4;
/// Sparse map slots in each GNU extension block.
const EXT_SPARSE_SLOTS: usize = 21;
const TAR_BLOCK: u64 = 512;
/// Most data ranges in one entry's map: the header's slots and the extension blocks the
/// unpacker accepts by default, less the end marker.
const MAX_SEGMENTS: usize = HEADER_SPARSE_SLOTS + EXT_SPARSE_SLOTS * MAX_SPARSE_BLOCKS as usize - 1;

/// The byte ranges of `file` that hold data, or `None` if the file has no holes.
///
/// Every range but the last is stretched to a multiple of 512 bytes (reading zeros from the
/// hole that follows), since the GNU sparse format stores each range in whole tar blocks.
pub(super) fn data_segments(file: &File, meta: &Metadata) -> io::Result<Option<Vec<(u64, u64)>>> {
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
    let segments = coarsen(segments, size, MAX_SEGMENTS);
    if segments == [(0, size)] {
        return Ok(None);
    }
    Ok(Some(segments))
}

/// Merges data ranges across holes, coarser and coarser, until at most `max` remain: the
/// unpacker refuses longer maps (see [`super::ArchiveLimits::sparse_blocks`]), and storing a
/// few holes as zeros costs less than failing. Ranges stay 512-byte aligned.
fn coarsen(mut segments: Vec<(u64, u64)>, size: u64, max: usize) -> Vec<(u64, u64)> {
    let mut granule = TAR_BLOCK;
    while segments.len() > max {
        granule *= 2;
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(segments.len() / 2);
        for (start, end) in segments {
            let start = start / granule * granule;
            let end = end.next_multiple_of(granule).min(size);
            match merged.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        segments = merged;
    }
    segments
}

/// Turns `header` into an old-GNU sparse header for `segments` of a file of `size` bytes and
/// returns the extension blocks that must follow it in the stream.
pub(super) fn encode_map(
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
pub(super) struct SegmentReader<'a> {
    file: &'a File,
    segments: Vec<(u64, u64)>,
    next: usize,
    pos: u64,
    /// The builder cannot tell a failed read of the file from a failed write of the stream;
    /// the reader keeps its own error so that the report blames the right side.
    pub(super) failure: Option<io::Error>,
}

impl<'a> SegmentReader<'a> {
    pub(super) fn new(file: &'a File, segments: Vec<(u64, u64)>) -> Self {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn maps_beyond_four_ranges_go_to_chained_extension_blocks() {
        // 4 in the header, 21 in the first block, 1 (the end marker) in the second.
        let segments: Vec<(u64, u64)> = (0..25).map(|i| (i * 8192, i * 8192 + 512)).collect();
        let mut header = Header::new_gnu();
        let blocks = encode_map(&mut header, &segments, 1 << 20).unwrap();
        assert_eq!(header.entry_type(), EntryType::GNUSparse);
        assert_eq!(header.entry_size().unwrap(), 25 * 512);
        let gnu = header.as_gnu().unwrap();
        assert_eq!(gnu.real_size().unwrap(), 1 << 20);
        assert!(gnu.is_extended());
        assert_eq!(blocks.len(), 2 * 512);
        // The first block says another one follows; the second does not.
        assert_eq!(blocks[504], 1);
        assert_eq!(blocks[512 + 504], 0);
    }

    #[test]
    fn too_many_ranges_are_merged_across_holes_into_an_acceptable_map() {
        let size = 1 << 30;
        let islands: Vec<(u64, u64)> = (0..20_000)
            .map(|i| (i * 40_960, i * 40_960 + 512))
            .collect();
        let merged = coarsen(islands.clone(), size, MAX_SEGMENTS);
        assert!(merged.len() <= MAX_SEGMENTS, "{}", merged.len());
        assert!(merged.len() > MAX_SEGMENTS / 4, "merged more than needed");
        for pair in merged.windows(2) {
            assert!(pair[0].1 < pair[1].0, "{pair:?}");
            assert_eq!(pair[0].1 % TAR_BLOCK, 0);
        }
        for (start, end) in islands {
            assert!(merged.iter().any(|&(s, e)| s <= start && end <= e));
        }
        let mut header = Header::new_gnu();
        let blocks = encode_map(&mut header, &merged, size).unwrap();
        assert!(blocks.len() as u64 <= MAX_SPARSE_BLOCKS * TAR_BLOCK);
        // A short list is left alone.
        assert_eq!(
            coarsen(vec![(0, 512), (4096, 5000)], 5000, 4),
            [(0, 512), (4096, 5000)]
        );
    }

    #[test]
    fn a_shrinking_file_fails_the_read_instead_of_ending_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 100]).unwrap();
        let file = File::open(&path).unwrap();
        let mut reader = SegmentReader::new(&file, vec![(0, 100)]);
        std::fs::write(&path, [1u8; 10]).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            reader.read_to_end(&mut out).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(reader.failure.is_some());
    }
}
