//! A container's overlay upper directory as a tar stream: whole ([`pack_dir`] and
//! [`unpack_dir`]), or as the changes since an earlier [`pack_dir`] ([`pack_delta`] and
//! [`unpack_delta`]).
//!
//! The stream is a GNU-format tar archive, so that `tar -tvf` can inspect it, but it is only
//! meant to be read back by this module. The choices below are driven by the upper dir
//! having to come back bit-for-bit, overlayfs metadata included:
//!
//! * Entry headers are built by hand with [`tar::Header::new_gnu`] and written with
//!   [`tar::Builder::append`], because the `tar` crate's path helpers normalise names and link
//!   targets (they drop `.` components and collapse `//`) and reject long names that start
//!   with a byte that is not UTF-8. Names and link targets are copied as raw bytes; longer
//!   than 100 bytes, they get a GNU `L`/`K` long-name entry holding the exact bytes.
//! * Owners are numeric only, modes include the setuid/setgid/sticky bits and mtimes are whole
//!   seconds. The tree's root is stored as the directory entry `./` so that its owner, mode
//!   and xattrs (overlayfs keeps `trusted.overlay.*` on the upper root) travel too.
//! * Extended attributes of every namespace travel as PAX records (see the `xattrs` module).
//! * Files that share an inode are stored once; later names become hard-link entries
//!   pointing at the first name.
//! * Files with holes are written as old-GNU sparse entries (see the `sparse` module); the
//!   `tar` crate reads that format and recreates the holes by seeking, which is why regular
//!   files are unpacked with [`tar::Entry::unpack`].
//! * Sockets are not archived (see [`pack_dir`]).
//!
//! Unpacking does the rest by hand, entry by entry: the crate's own unpacker turns device
//! nodes and FIFOs into regular files and sets xattrs on regular files only.
//!
//! # Deltas
//!
//! A delta is an archive of the same format holding, first, one removal entry per path to
//! remove (deepest first), then every new or changed entry in full, parents before children
//! (see [`crate::rootfs::delta::diff`]). Directories are metadata-only entries, as in any
//! archive; a hard-link entry appears only when its target is in the same delta.
//!
//! A removal entry is an empty regular-file entry named by the path to remove (no trailing
//! slash, whatever the type of what it removes), with a PAX header holding the record
//! `MIGRATE.remove=1`, in the `VENDOR.keyword` form POSIX sets aside for extensions. The rest
//! of its header means nothing. Removing a directory removes everything below it. GNU tar
//! lists a removal as an empty file with mode `----------` and, extracting, warns that it
//! ignores the keyword and makes that empty file.

mod entry;
mod limits;
mod pack;
mod paths;
mod policy;
mod sparse;
mod unpack;
mod xattrs;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

pub use limits::{ArchiveLimits, Violation};
pub use pack::{measure_dir, pack_delta, pack_dir, pack_dir_within, DeltaPlan, DeltaSummary};
pub use policy::UnpackPolicy;
pub use unpack::{unpack_delta, unpack_dir};

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;

/// PAX keyword of a removal entry in a delta.
const REMOVE_KEY: &str = "MIGRATE.remove";
const REMOVE_VALUE: &[u8] = b"1";

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
    /// Removing an entry a delta removes or replaces.
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Setting the owner, mode, mtime or xattr set of an unpacked entry, or reading what it
    /// has to do so.
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
    /// Removing an extended attribute that a delta's entry no longer lists.
    #[error("removing extended attribute {name:?} from {path}")]
    RemoveXattr {
        path: PathBuf,
        name: OsString,
        #[source]
        source: io::Error,
    },
    /// The entry (or the target of a hard link) is absolute, contains `..`, would replace
    /// or remove the destination itself, or leads through a symlink.
    #[error("archive entry {path} would be unpacked outside the destination")]
    UnsafePath { path: PathBuf },
    /// A tar entry type that has no meaning in an upper dir (e.g. `g`, `V`).
    #[error("archive entry {path} has type {kind:?}, which cannot be recreated")]
    Unsupported { path: PathBuf, kind: char },
    /// The entry is inconsistent in a way the `tar` crate does not catch.
    #[error("archive entry {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: &'static str },
    /// A header breaks an [`ArchiveLimits`] bound, or frames the stream in a way this
    /// format never does; found before the `tar` crate read anything it announces.
    #[error("the archive header at byte {offset} is refused: {violation}")]
    Bounds { offset: u64, violation: Violation },
    /// Unpacking would keep more directory metadata in memory than
    /// [`ArchiveLimits::retained`] allows.
    #[error("archive entry {path} is refused: the archive's directories need more than {limit} bytes of metadata kept")]
    Retained { path: PathBuf, limit: u64 },
    /// The entry would grant privileges on the destination, which the [`UnpackPolicy`] does
    /// not allow.
    #[error("archive entry {path} has {what}, which only a migration allowed privileged content may bring")]
    Privileged { path: PathBuf, what: &'static str },
}
