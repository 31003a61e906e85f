//! Large image files travel as segments: byte ranges of one file, each on a
//! stream of its own, so that a page file CRIU is still writing can be sent
//! as it grows, and one large file keeps several streams (and their
//! compressors) busy instead of one.
//!
//! The sender cuts ranges ([`cut`]); the receiver admits each range of a
//! file at most once and never two that overlap ([`SegmentMap`]), and once
//! the manifest is in, checks that a file's segments cover it from its first
//! byte to its last without a gap ([`check_coverage`]). Every segment's bytes
//! are checksummed like any stream's, so a file whose segments pass all three
//! is byte for byte the file the source had.

use std::collections::HashMap;

/// Largest segment. Big enough that a stream's setup (a round trip, a
/// compressor) is noise, small enough that a file CRIU is writing at memory
/// speed has several in flight before the dump ends.
pub const SEGMENT_BYTES: u64 = 32 << 20;

/// The ranges `(offset, len)` of a file to send now, given that everything
/// before `sent` has gone and the file holds `size` bytes. While the file may
/// still grow (`complete` false) only whole segments are cut, so that none
/// ends in the middle of what CRIU writes next; once it is complete the rest
/// goes too, an empty file as one empty segment.
pub fn cut(sent: u64, size: u64, complete: bool) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut at = sent;
    while size.saturating_sub(at) >= SEGMENT_BYTES {
        ranges.push((at, SEGMENT_BYTES));
        at += SEGMENT_BYTES;
    }
    if complete && (at < size || (size == 0 && sent == 0)) {
        ranges.push((at, size.saturating_sub(at)));
    }
    ranges
}

/// Why a segment or a set of segments is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("{file}: a segment from byte {offset} of {len} bytes ends beyond any file's size")]
    Overflow { file: String, offset: u64, len: u64 },
    #[error(
        "{file}: bytes {offset}..{end} overlap bytes {other_offset}..{other_end}, sent before"
    )]
    Overlap {
        file: String,
        offset: u64,
        end: u64,
        other_offset: u64,
        other_end: u64,
    },
    #[error("{file}: no segment starts at byte {at}, where the one before ends")]
    Gap { file: String, at: u64 },
}

/// The ranges admitted so far, per file (keyed by whatever names a file
/// uniquely: round and name for images).
#[derive(Debug)]
pub struct SegmentMap<K> {
    files: HashMap<K, Vec<(u64, u64)>>,
}

impl<K> Default for SegmentMap<K> {
    fn default() -> Self {
        Self {
            files: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + std::fmt::Display> SegmentMap<K> {
    /// Admits bytes `offset..offset + len` of `file`, unless they overlap a
    /// range admitted before. `len` is what the stream declared: at most what
    /// it writes.
    pub fn admit(&mut self, file: K, offset: u64, len: u64) -> Result<(), SegmentError> {
        // Past i64::MAX no file offset exists (the seek would fail later).
        let end = offset
            .checked_add(len)
            .filter(|end| i64::try_from(*end).is_ok())
            .ok_or_else(|| SegmentError::Overflow {
                file: file.to_string(),
                offset,
                len,
            })?;
        let name = file.to_string();
        let ranges = self.files.entry(file).or_default();
        // Empty ranges overlap nothing, but two empty segments at one offset
        // would still be one stream twice: the caller refuses repeats.
        if let Some(&(other_offset, other_end)) = ranges
            .iter()
            .find(|(start, stop)| offset < *stop && *start < end)
        {
            return Err(SegmentError::Overlap {
                file: name,
                offset,
                end,
                other_offset,
                other_end,
            });
        }
        ranges.push((offset, end));
        Ok(())
    }
}

/// Checks that the segments `(offset, len)` of `file` (in any order) cover
/// it from byte 0 to their end, with no gap and no overlap.
pub fn check_coverage(file: &str, segments: &mut [(u64, u64)]) -> Result<(), SegmentError> {
    segments.sort_unstable();
    let mut at = 0u64;
    for &(offset, len) in segments.iter() {
        if offset != at {
            return Err(if offset < at {
                SegmentError::Overlap {
                    file: file.to_owned(),
                    offset,
                    end: offset.saturating_add(len),
                    other_offset: 0,
                    other_end: at,
                }
            } else {
                SegmentError::Gap {
                    file: file.to_owned(),
                    at,
                }
            });
        }
        at = offset
            .checked_add(len)
            .ok_or_else(|| SegmentError::Overflow {
                file: file.to_owned(),
                offset,
                len,
            })?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S: u64 = SEGMENT_BYTES;

    #[test]
    fn a_growing_file_is_cut_in_whole_segments_only() {
        assert_eq!(cut(0, S - 1, false), vec![]);
        assert_eq!(cut(0, 2 * S + 5, false), vec![(0, S), (S, S)]);
        assert_eq!(cut(2 * S, 2 * S + 5, false), vec![]);
    }

    #[test]
    fn a_complete_file_sends_its_rest() {
        assert_eq!(cut(2 * S, 2 * S + 5, true), vec![(2 * S, 5)]);
        assert_eq!(cut(0, S + 1, true), vec![(0, S), (S, 1)]);
        assert_eq!(cut(S, S, true), vec![]);
        assert_eq!(cut(0, 7, true), vec![(0, 7)]);
    }

    #[test]
    fn an_empty_file_is_one_empty_segment() {
        assert_eq!(cut(0, 0, true), vec![(0, 0)]);
        assert_eq!(cut(0, 0, false), vec![]);
    }

    #[test]
    fn what_cut_sends_covers_the_file() {
        for size in [0, 1, S - 1, S, S + 1, 5 * S + 3] {
            let grown = size / 2;
            let mut ranges = cut(0, grown, false);
            let sent = ranges.last().map_or(0, |(o, l)| o + l);
            ranges.extend(cut(sent, size, true));
            check_coverage("f", &mut ranges).unwrap();
            assert_eq!(ranges.iter().map(|(_, l)| l).sum::<u64>(), size);
        }
    }

    #[test]
    fn overlapping_segments_are_refused() {
        let mut map = SegmentMap::default();
        map.admit("a", 0, 10).unwrap();
        map.admit("a", 10, 10).unwrap();
        map.admit("b", 5, 10).unwrap();
        assert!(matches!(
            map.admit("a", 15, 1),
            Err(SegmentError::Overlap {
                other_offset: 10,
                other_end: 20,
                ..
            })
        ));
        assert!(map.admit("a", 9, 2).is_err());
        map.admit("a", 20, 0).unwrap();
    }

    #[test]
    fn a_segment_past_any_file_size_is_refused() {
        let mut map = SegmentMap::default();
        assert!(matches!(
            map.admit("a", u64::MAX - 1, 2),
            Err(SegmentError::Overflow { .. })
        ));
        assert!(map.admit("a", 1 << 63, 0).is_err());
    }

    #[test]
    fn coverage_needs_every_byte_from_the_first() {
        check_coverage("f", &mut [(10, 5), (0, 10)]).unwrap();
        check_coverage("f", &mut []).unwrap();
        assert_eq!(
            check_coverage("f", &mut [(0, 10), (11, 5)]),
            Err(SegmentError::Gap {
                file: "f".into(),
                at: 10
            })
        );
        assert!(matches!(
            check_coverage("f", &mut [(5, 5)]),
            Err(SegmentError::Gap { at: 0, .. })
        ));
        assert!(matches!(
            check_coverage("f", &mut [(0, 10), (5, 10)]),
            Err(SegmentError::Overlap { .. })
        ));
    }
}
