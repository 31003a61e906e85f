//! CRIU's own account of a dump: the `stats-dump` file it writes into the
//! image dir. Pre-copy decides from it whether another round is worth it
//! (pages written against pages skipped because unchanged since the parent).
//!
//! The file is a CRIU "service" image: the service magic, the stats magic,
//! then one length-prefixed protobuf `stats_entry` (images/stats.proto).

use std::path::{Path, PathBuf};

use prost::Message;

const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;
/// The entry is a few dozen bytes; anything far larger is not a stats file.
const MAX_ENTRY_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a CRIU stats image: {reason}")]
    Format { path: PathBuf, reason: &'static str },
    #[error("decoding {path}")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
}

/// `stats_entry` from images/stats.proto (only the dump half is read).
#[derive(Clone, PartialEq, prost::Message)]
struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    dump: Option<DumpStatsEntry>,
}

/// `dump_stats_entry`: times in microseconds, counts in pages.
#[derive(Clone, PartialEq, prost::Message)]
struct DumpStatsEntry {
    #[prost(uint32, tag = "1")]
    freezing_time: u32,
    #[prost(uint32, tag = "2")]
    frozen_time: u32,
    #[prost(uint32, tag = "3")]
    memdump_time: u32,
    #[prost(uint32, tag = "4")]
    memwrite_time: u32,
    #[prost(uint64, tag = "5")]
    pages_scanned: u64,
    #[prost(uint64, tag = "6")]
    pages_skipped_parent: u64,
    #[prost(uint64, tag = "7")]
    pages_written: u64,
    #[prost(uint64, tag = "9")]
    pages_lazy: u64,
}

/// What one dump or pre-dump did, as CRIU counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DumpStats {
    /// Time to freeze the processes, µs.
    pub freezing_us: u64,
    /// Time the processes stayed frozen inside CRIU, µs.
    pub frozen_us: u64,
    /// Time to collect memory into pipes (frozen), µs.
    pub memdump_us: u64,
    /// Time to write the collected memory out (after unfreezing in a pre-dump), µs.
    pub memwrite_us: u64,
    pub pages_scanned: u64,
    /// Pages unchanged since the parent round, not written again.
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
    /// Pages left for the lazy-pages daemon to fetch (post-copy).
    pub pages_lazy: u64,
}

impl DumpStats {
    pub fn read(image_dir: &Path) -> Result<Self, StatsError> {
        let path = image_dir.join("stats-dump");
        let bytes = std::fs::read(&path).map_err(|source| StatsError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&bytes).map_err(|e| match e {
            ParseError::Format(reason) => StatsError::Format { path, reason },
            ParseError::Decode(source) => StatsError::Decode { path, source },
        })
    }

    fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        let word = |at: usize| -> Result<u32, ParseError> {
            let field = bytes
                .get(at..at + 4)
                .ok_or(ParseError::Format("too short"))?;
            Ok(u32::from_le_bytes([field[0], field[1], field[2], field[3]]))
        };
        if word(0)? != IMG_SERVICE_MAGIC || word(4)? != STATS_MAGIC {
            return Err(ParseError::Format("wrong magic"));
        }
        let len = word(8)? as usize;
        if len > MAX_ENTRY_LEN {
            return Err(ParseError::Format("entry too large"));
        }
        let body = bytes
            .get(12..12 + len)
            .ok_or(ParseError::Format("entry cut short"))?;
        let entry = StatsEntry::decode(body).map_err(ParseError::Decode)?;
        let dump = entry.dump.ok_or(ParseError::Format("no dump entry"))?;
        Ok(Self {
            freezing_us: dump.freezing_time.into(),
            frozen_us: dump.frozen_time.into(),
            memdump_us: dump.memdump_time.into(),
            memwrite_us: dump.memwrite_time.into(),
            pages_scanned: dump.pages_scanned,
            pages_skipped_parent: dump.pages_skipped_parent,
            pages_written: dump.pages_written,
            pages_lazy: dump.pages_lazy,
        })
    }
}

enum ParseError {
    Format(&'static str),
    Decode(prost::DecodeError),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The head of a real stats-dump written by CRIU 4.2.1 for a lazy dump.
    const RECORDED: &[u8] = &[
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x22, 0x00, 0x00, 0x00, 0x0a, 0x20, 0x08,
        0x00, 0x10, 0x80, 0xcc, 0x88, 0xeb, 0x04, 0x18, 0x00, 0x20, 0x00, 0x28, 0x00, 0x30, 0x00,
        0x38, 0x00, 0x40, 0x00, 0x48, 0x00, 0x50, 0x00, 0x58, 0x00, 0x60, 0x00, 0x68, 0x00, 0x70,
        0x00,
    ];

    fn encoded(dump: DumpStatsEntry) -> Vec<u8> {
        let body = StatsEntry { dump: Some(dump) }.encode_to_vec();
        let mut out = IMG_SERVICE_MAGIC.to_le_bytes().to_vec();
        out.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn reads_a_recorded_criu_file() {
        let stats = DumpStats::parse(RECORDED).ok().unwrap();
        assert_eq!(stats.frozen_us, 1_298_277_888);
        assert_eq!(stats.pages_written, 0);
    }

    #[test]
    fn reads_page_counts() {
        let bytes = encoded(DumpStatsEntry {
            freezing_time: 10,
            frozen_time: 2000,
            memdump_time: 800,
            memwrite_time: 300,
            pages_scanned: 1000,
            pages_skipped_parent: 900,
            pages_written: 100,
            pages_lazy: 0,
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stats-dump"), bytes).unwrap();
        let stats = DumpStats::read(dir.path()).unwrap();
        assert_eq!(stats.pages_skipped_parent, 900);
        assert_eq!(stats.pages_written, 100);
        assert_eq!(stats.memdump_us, 800);
    }

    #[test]
    fn refuses_what_is_not_a_stats_file() {
        assert!(DumpStats::parse(b"short").is_err());
        let mut wrong = RECORDED.to_vec();
        wrong[4] ^= 1;
        assert!(DumpStats::parse(&wrong).is_err());
        let mut huge = RECORDED.to_vec();
        huge[8..12].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(DumpStats::parse(&huge).is_err());
        assert!(DumpStats::parse(&RECORDED[..20]).is_err());
    }
}
