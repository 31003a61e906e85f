//! What a packing walk saw of a tree: for each entry, the parts of its `stat` that change
//! whenever the entry does, so that a later walk can tell what to send again (see
//! [`super::delta`]).

use std::collections::BTreeMap;
use std::fs::{FileType, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The entries one walk archived and when that walk started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSnapshot {
    /// Wall-clock time taken before the walk statted anything.
    pub started: Timestamp,
    /// Keyed by path relative to the tree's root, the root itself being the empty path.
    /// `PathBuf` orders component by component, so iteration follows the walk: every
    /// directory comes right before what is below it.
    pub entries: BTreeMap<PathBuf, EntryStat>,
}

/// An entry's `lstat`, as taken before its content was read.
///
/// Any change to an entry changes at least one of these fields, given timestamps fine
/// enough to tell the change from the walk; [`super::delta::diff`] covers the case where
/// they are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryStat {
    pub kind: EntryKind,
    pub dev: u64,
    pub ino: u64,
    /// Permission bits, setuid, setgid and sticky included; the type is in `kind`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Timestamp,
    /// Also moves on owner, mode, xattr and link-count changes, and cannot be set back by
    /// hand the way the mtime can.
    pub ctime: Timestamp,
    pub nlink: u64,
    pub rdev: u64,
}

/// The types of entry an archive holds. Sockets have none: they are never archived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Fifo,
    /// Whiteouts among them (device 0:0).
    CharDevice,
    BlockDevice,
}

impl EntryKind {
    /// `None` for sockets.
    pub fn of(file_type: FileType) -> Option<Self> {
        Some(if file_type.is_file() {
            Self::File
        } else if file_type.is_dir() {
            Self::Dir
        } else if file_type.is_symlink() {
            Self::Symlink
        } else if file_type.is_fifo() {
            Self::Fifo
        } else if file_type.is_char_device() {
            Self::CharDevice
        } else if file_type.is_block_device() {
            Self::BlockDevice
        } else {
            return None;
        })
    }
}

impl EntryStat {
    /// `None` for sockets, which are not archived.
    pub fn of(meta: &Metadata) -> Option<Self> {
        Some(Self {
            kind: EntryKind::of(meta.file_type())?,
            dev: meta.dev(),
            ino: meta.ino(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.size(),
            mtime: Timestamp::new(meta.mtime(), meta.mtime_nsec()),
            ctime: Timestamp::new(meta.ctime(), meta.ctime_nsec()),
            nlink: meta.nlink(),
            rdev: meta.rdev(),
        })
    }
}

/// A point in time as `stat` reports it: seconds since the epoch (negative before it) and
/// nanoseconds within the second, so the derived order is the chronological one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    /// Always below 1e9.
    pub nanos: u32,
}

const NANOS_PER_SEC: i64 = 1_000_000_000;

impl Timestamp {
    /// Normalises `nanos` into `0..1e9`, carrying into `secs`.
    pub fn new(secs: i64, nanos: i64) -> Self {
        let secs = secs.saturating_add(nanos.div_euclid(NANOS_PER_SEC));
        // rem_euclid of a positive modulus lies in 0..1e9, which fits.
        let nanos = nanos.rem_euclid(NANOS_PER_SEC) as u32;
        Self { secs, nanos }
    }

    pub fn now() -> Self {
        SystemTime::now().into()
    }

    /// `self - by`, saturating at the earliest representable time.
    pub fn saturating_sub(self, by: Duration) -> Self {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        Self::new(
            self.secs.saturating_sub(secs),
            i64::from(self.nanos) - i64::from(by.subsec_nanos()),
        )
    }
}

impl From<SystemTime> for Timestamp {
    fn from(time: SystemTime) -> Self {
        let epoch = Self { secs: 0, nanos: 0 };
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => Self::new(
                i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
                i64::from(after.subsec_nanos()),
            ),
            Err(before) => epoch.saturating_sub(before.duration()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_normalise_and_order_chronologically() {
        assert_eq!(
            Timestamp::new(5, -1),
            Timestamp {
                secs: 4,
                nanos: 999_999_999
            }
        );
        assert_eq!(
            Timestamp::new(5, 2_000_000_001),
            Timestamp { secs: 7, nanos: 1 }
        );
        let t = Timestamp::new(10, 100);
        assert_eq!(
            t.saturating_sub(Duration::new(1, 200)),
            Timestamp::new(8, 999_999_900)
        );
        assert!(Timestamp::new(-1, 999_999_999) < Timestamp::new(0, 0));
        let before_epoch = UNIX_EPOCH - Duration::new(3, 5);
        assert_eq!(Timestamp::from(before_epoch), Timestamp::new(-3, -5));
        let after_epoch = UNIX_EPOCH + Duration::new(3, 5);
        assert_eq!(Timestamp::from(after_epoch), Timestamp::new(3, 5));
    }

    #[test]
    fn entry_stat_reads_what_reveals_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let stat = EntryStat::of(&meta).unwrap();
        assert_eq!(stat.kind, EntryKind::File);
        assert_eq!((stat.size, stat.nlink, stat.ino), (5, 1, meta.ino()));
        assert_eq!(stat.mtime, Timestamp::new(meta.mtime(), meta.mtime_nsec()));

        let socket = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(
            EntryStat::of(&std::fs::symlink_metadata(&socket).unwrap()),
            None
        );
    }
}
