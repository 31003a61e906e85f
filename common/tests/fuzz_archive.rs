//! Fuzzing archive extraction: archives from the wire, unpacked as the destination does
//! ([`unpack_dir`] into an empty directory, [`unpack_delta`] onto a base holding symlinks
//! that point out of it, and both behind a data stream's declared size and zstd,
//! [`transfer::receive_stream`]), under the default [`UnpackPolicy`] and [`ArchiveLimits`].
//!
//! Inputs: the seed corpus (`common/fuzz/corpus/archive/`) and hostile archives built here
//! (long names, PAX records, huge sizes, `..`, absolute paths, symlinks then paths through
//! them, device nodes, setuid bits, hard links out of the tree), changed by tar-aware
//! mutations (header fields, with their checksums fixed or not) and byte-level ones.
//!
//! Whatever the input: no panic; nothing outside the destination changes (its siblings and
//! what the base's symlinks point at are compared before and after, inode numbers, link
//! counts and change times included); under the default policy the destination holds no
//! device node but 0:0 whiteouts, no setuid or setgid file and no privileged xattr; memory
//! stays within what the limits allow; and an error is the typed [`ArchiveError`] that
//! names what is wrong (a second target checks the exact error of each kind of hostile
//! entry).
//!
//! `MIGRATE_FUZZ_SECS` sets how long each target runs (see `common/fuzz/README.md`).

#![allow(clippy::unwrap_used)]

#[macro_use]
mod fuzz_support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use migrate_common::protocol::{write_frame, StreamHeader, StreamKind};
use migrate_common::rootfs::archive::{
    pack_delta, pack_dir, unpack_delta, unpack_dir, ArchiveError, ArchiveLimits, UnpackPolicy,
};
use migrate_common::transfer::{self, ByteBudget, TransferError, TransferStats};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;

use fuzz_support::{peak_of, Mutation};

const BLOCK: usize = 512;
/// Stands for the absolute path of the directory beside the destination in names and link
/// targets; replaced when an archive is built.
const OUTSIDE: &[u8] = b"@OUTSIDE@";

// --- Building archives byte by byte ----------------------------------------------------

/// Writes `value` as the NUL-terminated octal tar uses, or base-256 when it does not fit.
fn put_number(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    if text.len() <= digits {
        field[..digits].copy_from_slice(text.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        let bytes = value.to_be_bytes();
        let width = field.len();
        let n = bytes.len().min(width - 1);
        field[width - n..].copy_from_slice(&bytes[bytes.len() - n..]);
        field[0] |= 0x80;
    }
}

fn put_bytes(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
    field[n..].fill(0);
}

/// The checksum tar's readers expect: unsigned bytes, the checksum field counted as spaces.
fn set_checksum(block: &mut [u8]) {
    block[148..156].fill(b' ');
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn looks_like_header(block: &[u8]) -> bool {
    &block[257..262] == b"ustar"
}

/// Recomputes the checksum of every block that looks like a header.
fn fix_checksums(archive: &mut [u8]) {
    for block in archive.chunks_exact_mut(BLOCK) {
        if looks_like_header(block) {
            set_checksum(block);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Gnu,
    /// ustar, whose prefix field the reader puts before the name.
    Ustar,
}

/// One header block.
#[allow(clippy::too_many_arguments)]
fn header(
    format: Format,
    name: &[u8],
    kind: u8,
    link: &[u8],
    mode: u64,
    size: u64,
    dev: (u64, u64),
    prefix: &[u8],
) -> [u8; BLOCK] {
    let mut block = [0u8; BLOCK];
    put_bytes(&mut block[0..100], name);
    put_number(&mut block[100..108], mode);
    // Owned by whoever unpacks, so that an unprivileged run can set the owner too.
    put_number(
        &mut block[108..116],
        u64::from(nix::unistd::geteuid().as_raw()),
    );
    put_number(
        &mut block[116..124],
        u64::from(nix::unistd::getegid().as_raw()),
    );
    put_number(&mut block[124..136], size);
    put_number(&mut block[136..148], 1_700_000_000);
    block[156] = kind;
    put_bytes(&mut block[157..257], link);
    match format {
        Format::Gnu => block[257..265].copy_from_slice(b"ustar  \0"),
        Format::Ustar => {
            block[257..265].copy_from_slice(b"ustar\x0000");
            put_bytes(&mut block[345..500], prefix);
        }
    }
    put_number(&mut block[329..337], dev.0);
    put_number(&mut block[337..345], dev.1);
    set_checksum(&mut block);
    block
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(BLOCK), 0);
}

/// A PAX record, its length counting itself.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut digits = 1;
    while (rest + digits).to_string().len() > digits {
        digits += 1;
    }
    let mut record = format!("{} ", rest + digits).into_bytes();
    record.extend_from_slice(key);
    record.push(b'=');
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

/// What an entry's size field says, against the data that follows it.
#[derive(Debug, Clone)]
enum SizeField {
    /// The data's length.
    Data,
    Value(u64),
}

/// A hostile entry: any name, type, mode, size, link target, device number and PAX records.
#[derive(Debug, Clone)]
struct Raw {
    format: Format,
    name: Vec<u8>,
    /// ustar only.
    prefix: Vec<u8>,
    kind: u8,
    link: Vec<u8>,
    mode: u64,
    size: SizeField,
    data: usize,
    dev: (u64, u64),
    /// Whole records; an odd one may be malformed.
    pax: Vec<Vec<u8>>,
}

impl Raw {
    fn plain(name: &[u8], kind: u8) -> Self {
        Self {
            format: Format::Gnu,
            name: name.to_vec(),
            prefix: Vec::new(),
            kind,
            link: Vec::new(),
            mode: 0o644,
            size: SizeField::Data,
            data: if kind == b'0' { 4 } else { 0 },
            dev: (0, 0),
            pax: Vec::new(),
        }
    }

    fn link(mut self, target: &[u8]) -> Self {
        self.link = target.to_vec();
        self
    }

    fn mode(mut self, mode: u64) -> Self {
        self.mode = mode;
        self
    }

    fn dev(mut self, major: u64, minor: u64) -> Self {
        self.dev = (major, minor);
        self
    }

    fn pax(mut self, key: &[u8], value: &[u8]) -> Self {
        self.pax.push(pax_record(key, value));
        self
    }

    /// Appends the entry: long-name entries for a name or link beyond its field, a PAX
    /// header for the records, the header, then the data.
    fn write(&self, out: &mut Vec<u8>, outside: &[u8]) {
        let name = replace(&self.name, outside);
        let link = replace(&self.link, outside);
        for (long, kind) in [(&name, b'L'), (&link, b'K')] {
            if long.len() > 100 && self.format == Format::Gnu {
                let size = long.len() as u64 + 1;
                out.extend_from_slice(&header(
                    Format::Gnu,
                    b"././@LongLink",
                    kind,
                    b"",
                    0o644,
                    size,
                    (0, 0),
                    b"",
                ));
                out.extend_from_slice(long);
                out.push(0);
                pad(out);
            }
        }
        if !self.pax.is_empty() {
            let records: Vec<u8> = self.pax.concat();
            let records = replace(&records, outside);
            out.extend_from_slice(&header(
                self.format,
                b"PaxHeaders/x",
                b'x',
                b"",
                0o644,
                records.len() as u64,
                (0, 0),
                b"",
            ));
            out.extend_from_slice(&records);
            pad(out);
        }
        let size = match self.size {
            SizeField::Data => self.data as u64,
            SizeField::Value(v) => v,
        };
        out.extend_from_slice(&header(
            self.format,
            &name,
            self.kind,
            &link,
            self.mode,
            size,
            self.dev,
            &self.prefix,
        ));
        out.extend((0..self.data).map(|i| b"evil"[i % 4]));
        pad(out);
    }
}

/// `bytes` with every [`OUTSIDE`] replaced by `outside`.
fn replace(bytes: &[u8], outside: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(at) = rest.windows(OUTSIDE.len()).position(|w| w == OUTSIDE) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(outside);
        rest = &rest[at + OUTSIDE.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// How a built archive ends.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Marker,
    OneZeroBlock,
    Nothing,
    /// Cut inside the last block.
    Torn(u16),
}

fn build(entries: &[Raw], ending: Ending, outside: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        entry.write(&mut out, outside);
    }
    match ending {
        Ending::Marker => out.resize(out.len() + 2 * BLOCK, 0),
        Ending::OneZeroBlock => out.resize(out.len() + BLOCK, 0),
        Ending::Nothing => {}
        Ending::Torn(n) => out.truncate(out.len().saturating_sub(usize::from(n) % BLOCK + 1)),
    }
    out
}

// --- The scratch directory -------------------------------------------------------------

/// `root/dest` is where archives are unpacked; beside it, `root/outside` (a file and a
/// directory) and `root/sibling` must come out untouched. The base a delta applies to
/// holds symlinks to all of them, and a hard link pair.
struct Scratch {
    root: tempfile::TempDir,
    before: BTreeMap<PathBuf, Identity>,
}

/// What must not change about an entry outside the destination.
#[derive(Debug, PartialEq, Eq)]
struct Identity {
    mode: u32,
    owner: (u32, u32),
    ino: u64,
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Vec<u8>,
    xattrs: Vec<std::ffi::OsString>,
}

fn identity(path: &Path) -> Identity {
    let meta = fs::symlink_metadata(path).unwrap();
    let content = if meta.is_file() {
        fs::read(path).unwrap()
    } else if meta.file_type().is_symlink() {
        fs::read_link(path).unwrap().into_os_string().into_vec()
    } else {
        Vec::new()
    };
    let mut xattrs: Vec<_> = xattr::list(path).map(|l| l.collect()).unwrap_or_default();
    xattrs.sort();
    Identity {
        mode: meta.mode(),
        owner: (meta.uid(), meta.gid()),
        ino: meta.ino(),
        nlink: meta.nlink(),
        size: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
        content,
        xattrs,
    }
}

impl Scratch {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"untouched").unwrap();
        fs::create_dir(outside.join("vdir")).unwrap();
        fs::write(root.path().join("sibling"), b"untouched").unwrap();
        fs::create_dir(root.path().join("dest")).unwrap();
        let mut scratch = Self {
            root,
            before: BTreeMap::new(),
        };
        scratch.before = scratch.outside_state();
        scratch
    }

    fn dest(&self) -> PathBuf {
        self.root.path().join("dest")
    }

    fn outside(&self) -> PathBuf {
        self.root.path().join("outside")
    }

    fn outside_bytes(&self) -> Vec<u8> {
        self.outside().into_os_string().into_vec()
    }

    /// Everything in the scratch dir but the destination; the root's own times change when
    /// the destination is made anew, so they are left out.
    fn outside_state(&self) -> BTreeMap<PathBuf, Identity> {
        let mut state = BTreeMap::new();
        let mut root = identity(self.root.path());
        (root.mtime, root.ctime, root.nlink) = ((0, 0), (0, 0), 0);
        state.insert(PathBuf::new(), root);
        let mut stack = vec![self.root.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path == self.dest() {
                    continue;
                }
                let id = identity(&path);
                if fs::symlink_metadata(&path).unwrap().is_dir() {
                    stack.push(path.clone());
                }
                let rel = path.strip_prefix(self.root.path()).unwrap().to_path_buf();
                state.insert(rel, id);
            }
        }
        state
    }

    /// A fresh destination: empty, or the base of a delta.
    fn reset(&self, base: bool) {
        let dest = self.dest();
        make_removable(&dest);
        fs::remove_dir_all(&dest).unwrap();
        fs::create_dir(&dest).unwrap();
        if base {
            make_base(&dest, Some(&self.outside()));
        }
    }

    /// What changed outside the destination, if anything.
    fn escaped(&self) -> Option<String> {
        let now = self.outside_state();
        if now == self.before {
            return None;
        }
        let mut changes = Vec::new();
        for (path, id) in &now {
            match self.before.get(path) {
                None => changes.push(format!("{} appeared", path.display())),
                Some(old) if old != id => {
                    changes.push(format!("{} changed: {old:?} became {id:?}", path.display()))
                }
                _ => {}
            }
        }
        for path in self.before.keys().filter(|p| !now.contains_key(*p)) {
            changes.push(format!("{} went", path.display()));
        }
        Some(changes.join("; "))
    }
}

/// The base a delta applies to: a small tree, symlinks out of it (relative; and absolute to
/// `outside`, when given) and a hard link pair.
fn make_base(dest: &Path, outside: Option<&Path>) {
    fs::create_dir(dest.join("dir")).unwrap();
    fs::write(dest.join("dir/file"), b"base").unwrap();
    fs::write(dest.join("file"), b"base").unwrap();
    fs::hard_link(dest.join("file"), dest.join("hard")).unwrap();
    symlink("../outside", dest.join("link-out")).unwrap();
    symlink("../outside/victim", dest.join("link-victim")).unwrap();
    symlink("../outside/vdir", dest.join("link-vdir")).unwrap();
    symlink("../sibling", dest.join("link-sibling")).unwrap();
    if let Some(outside) = outside {
        symlink(outside, dest.join("link-abs")).unwrap();
    }
}

/// What [`make_base`] puts in the destination's top directory, its absolute symlink included.
const BASE_ENTRIES: usize = 8;

/// Gives every directory under `dir` an owner-writable mode, so that what an archive made
/// read-only can be removed.
fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if meta.is_dir() {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                make_removable(&entry.path());
            }
        }
    }
}

/// Under the default policy: no device node but 0:0 character devices, no setuid or setgid
/// bit on anything but a directory, no xattr that grants privileges.
fn privileges_in(dest: &Path) -> Option<String> {
    let mut stack = vec![dest.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let kind = meta.file_type();
            if kind.is_block_device() || (kind.is_char_device() && meta.rdev() != 0) {
                return Some(format!(
                    "{} is a device node ({:#x})",
                    path.display(),
                    meta.rdev()
                ));
            }
            if !kind.is_dir() && !kind.is_symlink() && meta.mode() & 0o6000 != 0 {
                return Some(format!("{} has mode {:o}", path.display(), meta.mode()));
            }
            for name in xattr::list(&path).into_iter().flatten() {
                let name = name.as_bytes();
                if name == b"security.capability"
                    || (name.starts_with(b"trusted.") && !name.starts_with(b"trusted.overlay."))
                {
                    return Some(format!(
                        "{} has xattr {}",
                        path.display(),
                        String::from_utf8_lossy(name)
                    ));
                }
            }
            if kind.is_dir() {
                stack.push(path);
            }
        }
    }
    None
}

/// Most an unpack may hold at once: the largest extension the limits let through, held by
/// the guard, the crate and as decoded xattrs; the crate's buffers; and, proportional to the
/// input, what is kept of directories until the end.
fn unpack_bound(input_len: usize) -> usize {
    let limits = ArchiveLimits::default();
    4 * limits.pax_header as usize + 2 * limits.long_name as usize + (1 << 20) + 16 * input_len
}

/// A guard refusal that lost its type on the way out would be a `Decode` error carrying the
/// guard's message.
fn untyped(err: &ArchiveError) -> Option<String> {
    match err {
        ArchiveError::Decode { source, .. }
            if source.to_string().starts_with("the archive header at byte") =>
        {
            Some(format!("a guard refusal came out untyped: {err}"))
        }
        _ => None,
    }
}

// --- Inputs ----------------------------------------------------------------------------

/// Names a hostile sender would try, for entries and for link targets.
const NAMES: &[&[u8]] = &[
    b"",
    b".",
    b"./",
    b"..",
    b"../x",
    b"../outside/victim",
    b"../outside/new",
    b"a/../../outside/new",
    b"../sibling",
    b"a",
    b"a/",
    b"a/b",
    b"a/b/",
    b"a/b/c",
    b"x",
    b"x/",
    b"x/y",
    b"./x",
    b"x//y",
    b"x/./y",
    b"dir",
    b"dir/",
    b"dir/file",
    b"dir/new",
    b"file",
    b"hard",
    b"link-out",
    b"link-out/",
    b"link-out/new",
    b"link-out/victim",
    b"link-out/vdir/new",
    b"link-abs/new",
    b"link-victim",
    b"link-vdir",
    b"link-vdir/",
    b"link-vdir/new",
    b"link-sibling",
    b"/",
    b"/abs",
    b"@OUTSIDE@",
    b"@OUTSIDE@/",
    b"@OUTSIDE@/victim",
    b"@OUTSIDE@/new",
    b"@OUTSIDE@/vdir",
];

const KINDS: &[u8] = b"00000011222345566677SLKxgVMDN\0";

const MODES: &[u64] = &[
    0o644, 0o755, 0o777, 0, 0o4755, 0o2755, 0o6777, 0o7777, 0o1777, 0o2775,
];

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => select(NAMES).prop_map(<[u8]>::to_vec),
        // Long: past the name field, past PATH_MAX.
        1 => (select(vec![101usize, 200, 255, 256, 4095, 4096, 5000]), select(vec![b'n', b'/']))
            .prop_map(|(len, c)| {
                let mut name: Vec<u8> = (0..len).map(|i| if i % 50 == 49 { c } else { b'n' }).collect();
                name[0] = b'n';
                name
            }),
        1 => vec(any::<u8>(), 0..20),
    ]
}

fn pax_records() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let record = prop_oneof![
        4 => (select(vec![
            &b"SCHILY.xattr.user.x"[..],
            b"SCHILY.xattr.trusted.overlay.opaque",
            b"SCHILY.xattr.trusted.evil",
            b"SCHILY.xattr.security.capability",
            b"SCHILY.xattr.security.selinux",
            b"LIBARCHIVE.xattr.user.b%3d64",
            b"LIBARCHIVE.xattr.security.capability",
            b"SCHILY.xattr.",
        ]), select(vec![&b"v"[..], b"", b"AAAA", b"\x00\n=\xff", b"!!notbase64"]))
            .prop_map(|(k, v)| pax_record(k, v)),
        2 => (select(vec![&b"MIGRATE.remove"[..]]), select(vec![&b"1"[..], b"0", b""]))
            .prop_map(|(k, v)| pax_record(k, v)),
        2 => (select(vec![
            &b"path"[..], b"linkpath", b"size", b"uid", b"gid", b"mtime",
            b"GNU.sparse.map", b"GNU.sparse.size", b"SCHILY.devmajor", b"comment",
        ]), select(vec![&b"0"[..], b"../outside/victim", b"99999999999", b"@OUTSIDE@/new"]))
            .prop_map(|(k, v)| pax_record(k, v)),
        // A value past the kernel's xattr limits, or past the PAX header limit.
        1 => select(vec![(64usize << 10) + 1, 400 << 10])
            .prop_map(|n| pax_record(b"SCHILY.xattr.user.big", &vec![b'v'; n])),
        1 => vec(any::<u8>(), 1..24),
        1 => Just(b"99999999999999999999 k=v\n".to_vec()),
        1 => Just(b"3 =\n".to_vec()),
    ];
    vec(record, 0..3)
}

fn raw_entry() -> impl Strategy<Value = Raw> {
    (
        (
            prop_oneof![8 => Just(Format::Gnu), 1 => Just(Format::Ustar)],
            name(),
            prop_oneof![6 => Just(Vec::new()), 1 => name()],
            select(KINDS),
            name(),
        ),
        (
            prop_oneof![4 => select(MODES), 1 => any::<u64>()],
            prop_oneof![
                8 => Just(SizeField::Data),
                1 => select(vec![0u64, 1, 511, 512, 1 << 20, 1 << 33, u64::MAX >> 2, u64::MAX])
                    .prop_map(SizeField::Value),
            ],
            prop_oneof![4 => Just(0usize), 2 => 1usize..600, 1 => Just(70_000usize)],
            prop_oneof![4 => Just((0u64, 0u64)), 1 => (0u64..16, 0u64..16), 1 => (any::<u64>(), any::<u64>())],
            pax_records(),
        ),
    )
        .prop_map(|((format, name, prefix, kind, link), (mode, size, data, dev, pax))| Raw {
            format,
            name,
            prefix,
            kind,
            link,
            mode,
            size,
            data,
            dev,
            pax,
        })
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        8 => Just(Ending::Marker),
        1 => Just(Ending::OneZeroBlock),
        1 => Just(Ending::Nothing),
        1 => any::<u16>().prop_map(Ending::Torn),
    ]
}

/// A change to one header (or block) of an archive, found wherever it is.
#[derive(Debug, Clone)]
enum HeaderChange {
    Size(u64),
    Kind(u8),
    Name(Vec<u8>),
    Link(Vec<u8>),
    Mode(u64),
    Dev(u64, u64),
    /// A numeric field in base-256, which the crate reads too.
    Base256(Index, u8),
    /// The GNU sparse header's "extended" flag.
    Extended(bool),
    Duplicate(Index),
    Drop,
}

fn header_change() -> impl Strategy<Value = HeaderChange> {
    prop_oneof![
        select(vec![
            0u64,
            1,
            100,
            511,
            512,
            513,
            4096,
            1 << 20,
            1 << 33,
            u64::MAX >> 2
        ])
        .prop_map(HeaderChange::Size),
        select(KINDS).prop_map(HeaderChange::Kind),
        name().prop_map(HeaderChange::Name),
        name().prop_map(HeaderChange::Link),
        select(MODES).prop_map(HeaderChange::Mode),
        (0u64..10, 0u64..10).prop_map(|(a, b)| HeaderChange::Dev(a, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| HeaderChange::Base256(i, b)),
        any::<bool>().prop_map(HeaderChange::Extended),
        any::<Index>().prop_map(HeaderChange::Duplicate),
        Just(HeaderChange::Drop),
    ]
}

impl HeaderChange {
    fn apply(&self, archive: &mut Vec<u8>, at: Index, outside: &[u8]) {
        let headers: Vec<usize> = (0..archive.len() / BLOCK)
            .map(|i| i * BLOCK)
            .filter(|&o| looks_like_header(&archive[o..o + BLOCK]))
            .collect();
        if headers.is_empty() {
            return;
        }
        let o = *at.get(&headers);
        let block = &mut archive[o..o + BLOCK];
        match self {
            HeaderChange::Size(size) => put_number(&mut block[124..136], *size),
            HeaderChange::Kind(kind) => block[156] = *kind,
            HeaderChange::Name(name) => put_bytes(&mut block[0..100], &replace(name, outside)),
            HeaderChange::Link(link) => put_bytes(&mut block[157..257], &replace(link, outside)),
            HeaderChange::Mode(mode) => put_number(&mut block[100..108], *mode),
            HeaderChange::Dev(major, minor) => {
                put_number(&mut block[329..337], *major);
                put_number(&mut block[337..345], *minor);
            }
            HeaderChange::Base256(field, byte) => {
                let field = *field.get(&[100usize, 108, 116, 124, 136, 329, 337]);
                block[field] = 0x80 | (byte & 0x7f);
            }
            HeaderChange::Extended(on) => block[482] = u8::from(*on),
            HeaderChange::Duplicate(to) => {
                let copy = block.to_vec();
                let to = to.index(archive.len() / BLOCK + 1) * BLOCK;
                archive.splice(to..to, copy);
            }
            HeaderChange::Drop => {
                archive.drain(o..o + BLOCK);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum ArchiveSource {
    Seed(Index),
    Built(Vec<Raw>, Ending),
}

#[derive(Debug, Clone)]
struct ArchiveInput {
    source: ArchiveSource,
    changes: Vec<(Index, HeaderChange)>,
    /// After the header changes, most of the time, so that they are not caught by the
    /// checksums alone.
    fix_checksums: bool,
    mutations: Vec<Mutation>,
    /// Byte-level mutations run after the checksums were fixed, so that some are caught
    /// by them.
    late_mutations: Vec<Mutation>,
}

fn archive_input() -> impl Strategy<Value = ArchiveInput> {
    let source = prop_oneof![
        2 => any::<Index>().prop_map(ArchiveSource::Seed),
        3 => (vec(raw_entry(), 1..6), ending()).prop_map(|(e, end)| ArchiveSource::Built(e, end)),
    ];
    (
        source,
        vec((any::<Index>(), header_change()), 0..4),
        prop_oneof![6 => Just(true), 1 => Just(false)],
        vec(fuzz_support::mutation(), 0..3),
        prop_oneof![4 => Just(Vec::new()), 1 => vec(fuzz_support::mutation(), 1..3)],
    )
        .prop_map(
            |(source, changes, fix_checksums, mutations, late_mutations)| ArchiveInput {
                source,
                changes,
                fix_checksums,
                mutations,
                late_mutations,
            },
        )
}

impl ArchiveInput {
    fn build(&self, seeds: &[Vec<u8>], outside: &[u8]) -> Vec<u8> {
        let mut archive = match &self.source {
            ArchiveSource::Seed(index) => index.get(seeds).clone(),
            ArchiveSource::Built(entries, ending) => build(entries, *ending, outside),
        };
        for mutation in &self.mutations {
            mutation.apply(&mut archive, seeds);
        }
        for (at, change) in &self.changes {
            change.apply(&mut archive, *at, outside);
        }
        if self.fix_checksums {
            fix_checksums(&mut archive);
        }
        for mutation in &self.late_mutations {
            mutation.apply(&mut archive, seeds);
        }
        archive
    }
}

// --- The checks ------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Onto {
    Empty,
    Base,
}

/// Unpacks `input` as the destination does and checks everything that must hold.
fn unpack_and_check(
    scratch: &Scratch,
    input: &[u8],
    onto: Onto,
    policy: &UnpackPolicy,
) -> Result<Result<(), ArchiveError>, TestCaseError> {
    scratch.reset(onto == Onto::Base);
    let dest = scratch.dest();
    let (result, peak) = peak_of(|| match onto {
        Onto::Empty => unpack_dir(input, &dest, policy),
        Onto::Base => unpack_delta(input, &dest, policy),
    });
    check_after(scratch, input.len(), peak, &result, policy)?;
    Ok(result)
}

fn check_after(
    scratch: &Scratch,
    input_len: usize,
    peak: usize,
    result: &Result<(), ArchiveError>,
    policy: &UnpackPolicy,
) -> Result<(), TestCaseError> {
    if let Some(what) = scratch.escaped() {
        return Err(TestCaseError::fail(format!(
            "outside the destination: {what} (the unpack said {result:?})"
        )));
    }
    if !policy.allow_privileged {
        if let Some(what) = privileges_in(&scratch.dest()) {
            return Err(TestCaseError::fail(format!(
                "under the default policy: {what} (the unpack said {result:?})"
            )));
        }
    }
    let bound = unpack_bound(input_len);
    ensure!(
        peak <= bound,
        "unpacking {input_len} bytes held {peak} bytes at once, over {bound}"
    );
    if let Err(err) = result {
        if let Some(what) = untyped(err) {
            return Err(TestCaseError::fail(what));
        }
    }
    Ok(())
}

fn archive_seeds() -> Vec<Vec<u8>> {
    fuzz_support::corpus("archive")
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect()
}

// --- The seed corpus -------------------------------------------------------------------

/// A tree with one of each kind of entry: long names and link targets, xattrs (binary ones
/// too), a hard link, a FIFO, a whiteout, a setgid directory and a sparse file with enough
/// holes for extension blocks; every mtime fixed.
fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("file"), b"content\n").unwrap();
    fs::write(root.join("dir/sub/inner"), vec![7u8; 3000]).unwrap();
    let _ = xattr::set(root.join("file"), "user.plain", b"v");
    let _ = xattr::set(root.join("dir"), "user.binary", b"\x00\n=\xff");
    let _ = xattr::set(root.join("dir/sub"), "trusted.overlay.opaque", b"y");
    symlink("file", root.join("link")).unwrap();
    let long = "l".repeat(150);
    fs::write(root.join("dir").join(&long), b"long name").unwrap();
    symlink(format!("../{long}/{long}"), root.join("longlink")).unwrap();
    fs::hard_link(root.join("file"), root.join("dir/hardlink")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let _ = nix::sys::stat::mknod(
        &root.join("whiteout"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    );
    fs::create_dir(root.join("shared")).unwrap();
    nix::sys::stat::fchmodat(
        None,
        &root.join("shared"),
        nix::sys::stat::Mode::from_bits_truncate(0o2775),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .unwrap();
    let sparse = fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    for i in 0..30 {
        sparse.write_all_at(b"island", i * 256 * 1024).unwrap();
    }
    fix_mtimes(root);
}

/// Every entry's mtime set to one instant, deepest first, so that seeds do not change with
/// the day they were made.
fn fix_mtimes(dir: &Path) {
    let time = nix::sys::time::TimeSpec::new(1_700_000_000, 0);
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            fix_mtimes(&path);
        }
        nix::sys::stat::utimensat(
            None,
            &path,
            &time,
            &time,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
    nix::sys::stat::utimensat(
        None,
        dir,
        &time,
        &time,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

/// A hostile seed, and what unpacking it must fail with, into an empty directory and onto
/// the base (`None`: it succeeds).
struct Hostile {
    name: &'static str,
    entries: Vec<Raw>,
    empty: Option<&'static str>,
    base: Option<&'static str>,
}

fn hostile_seeds() -> Vec<Hostile> {
    let e = |name: &[u8], kind: u8| Raw::plain(name, kind);
    let unsafe_path = Some("UnsafePath");
    vec![
        Hostile {
            name: "escape-dotdot.tar",
            entries: vec![e(b"ok", b'0'), e(b"../outside/evil", b'0')],
            empty: unsafe_path,
            base: unsafe_path,
        },
        Hostile {
            name: "escape-absolute.tar",
            entries: vec![e(b"/tmp/migrate-fuzz-absolute", b'0')],
            empty: unsafe_path,
            base: unsafe_path,
        },
        Hostile {
            name: "symlink-then-through.tar",
            entries: vec![e(b"a", b'2').link(b"../outside"), e(b"a/x", b'0')],
            empty: unsafe_path,
            base: unsafe_path,
        },
        Hostile {
            name: "through-base-symlink.tar",
            entries: vec![e(b"link-out/evil", b'0')],
            empty: None,
            base: unsafe_path,
        },
        Hostile {
            name: "hardlink-out.tar",
            entries: vec![e(b"h", b'1').link(b"../outside/victim")],
            empty: unsafe_path,
            base: unsafe_path,
        },
        Hostile {
            name: "hardlink-through-symlink.tar",
            entries: vec![e(b"h", b'1').link(b"link-out/victim")],
            empty: Some("Create"),
            base: unsafe_path,
        },
        Hostile {
            name: "device-node.tar",
            entries: vec![e(b"whiteout", b'3'), e(b"mem", b'3').dev(1, 1)],
            empty: Some("Privileged"),
            base: Some("Privileged"),
        },
        Hostile {
            name: "setuid.tar",
            entries: vec![e(b"su", b'0').mode(0o4755)],
            empty: Some("Privileged"),
            base: Some("Privileged"),
        },
        Hostile {
            name: "capability.tar",
            entries: vec![e(b"cap", b'0').pax(b"SCHILY.xattr.security.capability", b"\x01")],
            empty: Some("Privileged"),
            base: Some("Privileged"),
        },
        Hostile {
            name: "pax-size.tar",
            entries: vec![e(b"f", b'0').pax(b"size", b"999999999")],
            empty: Some("Bounds"),
            base: Some("Bounds"),
        },
        Hostile {
            name: "long-name-beyond-path-max.tar",
            entries: vec![e(&vec![b'n'; 5000], b'0')],
            empty: Some("Bounds"),
            base: Some("Bounds"),
        },
        // Found by fuzz_unpack_delta and fuzz_transfer_streams: a directory's metadata, applied
        // last, followed what a later entry put at its path or its parent's.
        Hostile {
            name: "regression-delta-dir-then-symlink.tar",
            entries: vec![
                e(b"d/", b'5').mode(0o777),
                e(b"d", b'2').link(b"../outside"),
            ],
            empty: Some("Create"),
            base: unsafe_path,
        },
        Hostile {
            name: "regression-delta-dir-under-replaced-parent.tar",
            entries: vec![
                e(b"a/", b'5').mode(0o755),
                e(b"a/vdir/", b'5').mode(0o777),
                e(b"a", b'2').link(b"../outside"),
            ],
            empty: Some("Create"),
            base: unsafe_path,
        },
        Hostile {
            name: "regression-delta-setid-dir-then-file.tar",
            entries: vec![e(b"s/", b'5').mode(0o6755), e(b"s", b'0').mode(0o755)],
            empty: Some("Create"),
            base: Some("Malformed"),
        },
        Hostile {
            name: "removal-outside.tar",
            entries: vec![e(b"../outside/victim", b'0').pax(b"MIGRATE.remove", b"1")],
            empty: unsafe_path,
            base: unsafe_path,
        },
    ]
}

/// The generated seeds: a tree packed whole, the base a delta applies to and a delta onto
/// it, and the hostile archives.
fn archive_corpus() -> Vec<(String, Vec<u8>)> {
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("tree");
    fs::create_dir(&tree).unwrap();
    build_tree(&tree);
    let (tree_tar, _) = pack_dir(&tree, Vec::new()).unwrap();

    // The base, as the fuzzing makes it (but for its absolute symlink), then changed.
    let base = scratch.path().join("base");
    fs::create_dir(&base).unwrap();
    make_base(&base, None);
    fix_mtimes(&base);
    let (base_tar, snapshot) = pack_dir(&base, Vec::new()).unwrap();
    fs::write(base.join("file"), b"changed").unwrap();
    fs::remove_dir_all(base.join("dir")).unwrap();
    fs::remove_file(base.join("link-out")).unwrap();
    fs::create_dir(base.join("link-out")).unwrap();
    fs::write(base.join("link-out/new"), b"new").unwrap();
    fs::write(base.join("new"), b"new").unwrap();
    let _ = xattr::set(base.join("new"), "user.x", b"y");
    fix_mtimes(&base);
    let (delta_tar, _) = pack_delta(&base, &snapshot, Vec::new()).unwrap();

    let mut seeds = vec![
        ("tree.tar".to_string(), tree_tar),
        ("base.tar".to_string(), base_tar),
        ("delta.tar".to_string(), delta_tar),
    ];
    for hostile in hostile_seeds() {
        seeds.push((
            hostile.name.to_string(),
            build(&hostile.entries, Ending::Marker, b""),
        ));
    }
    seeds
}

/// Rewrites the generated seeds in `common/fuzz/corpus/archive/` (after a format change;
/// `archive_corpus_is_current` says when): `cargo test -p migrate-common --test
/// fuzz_archive -- --ignored write_archive_corpus`, as root (owners, the whiteout and the
/// `trusted.overlay.*` xattr).
#[test]
#[ignore = "rewrites common/fuzz/corpus/archive"]
fn write_archive_corpus() {
    fuzz_support::write_corpus("archive", &archive_corpus());
}

fn variant(err: &ArchiveError) -> &'static str {
    match err {
        ArchiveError::Read { .. } => "Read",
        ArchiveError::Write { .. } => "Write",
        ArchiveError::Decode { .. } => "Decode",
        ArchiveError::Create { .. } => "Create",
        ArchiveError::Remove { .. } => "Remove",
        ArchiveError::Metadata { .. } => "Metadata",
        ArchiveError::SetXattr { .. } => "SetXattr",
        ArchiveError::RemoveXattr { .. } => "RemoveXattr",
        ArchiveError::UnsafePath { .. } => "UnsafePath",
        ArchiveError::Unsupported { .. } => "Unsupported",
        ArchiveError::Malformed { .. } => "Malformed",
        ArchiveError::Bounds { .. } => "Bounds",
        ArchiveError::Retained { .. } => "Retained",
        ArchiveError::Privileged { .. } => "Privileged",
    }
}

/// The seeds on disk unpack as they are meant to under the default policy (the tree and
/// the base whole, the delta onto the base, each hostile one refused with its error), as do
/// the generator's; every file of the corpus, kept failures included, passes the checks.
#[test]
fn archive_corpus_is_current() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: the seeds are owned by root and hold trusted.overlay.* xattrs"
    );
    let on_disk = fuzz_support::corpus("archive");
    let generated = archive_corpus();
    let scratch = Scratch::new();
    let policy = UnpackPolicy::default();
    let mut expected: BTreeMap<String, (Option<&str>, Option<&str>)> = BTreeMap::new();
    expected.insert("tree.tar".into(), (None, Some("*")));
    expected.insert("base.tar".into(), (None, Some("*")));
    expected.insert("delta.tar".into(), (Some("*"), None));
    for hostile in hostile_seeds() {
        expected.insert(hostile.name.into(), (hostile.empty, hostile.base));
    }
    for (source, seeds) in [("on disk", &on_disk), ("generated", &generated)] {
        for (name, bytes) in seeds.iter() {
            for onto in [Onto::Empty, Onto::Base] {
                let result = unpack_and_check(&scratch, bytes, onto, &policy)
                    .unwrap_or_else(|e| panic!("{source} {name} onto {onto:?}: {e}"));
                let Some((empty, base)) = expected.get(name) else {
                    assert!(
                        name.starts_with("regression-"),
                        "{name}: not a seed the generator makes"
                    );
                    continue;
                };
                let want = if onto == Onto::Empty { empty } else { base };
                match (want, &result) {
                    (Some("*"), _) | (None, Ok(())) => {}
                    (Some(variant_name), Err(err)) if variant(err) == *variant_name => {}
                    _ => panic!("{source} {name} onto {onto:?}: expected {want:?}, got {result:?}"),
                }
            }
        }
    }
    for (name, _) in &generated {
        assert!(
            on_disk.iter().any(|(n, _)| n == name),
            "common/fuzz/corpus/archive/{name} is missing: run write_archive_corpus"
        );
    }
}

// --- The targets -----------------------------------------------------------------------

fn fuzz_unpack(target: &str, onto: Onto) {
    let seeds = archive_seeds();
    let scratch = Scratch::new();
    let outside = scratch.outside_bytes();
    let policy = UnpackPolicy::default();
    fuzz_support::fuzz(target, archive_input(), |input| {
        let bytes = input.build(&seeds, &outside);
        unpack_and_check(&scratch, &bytes, onto, &policy)
            .map(|_| ())
            .inspect_err(|_| {
                fuzz_support::keep_failure(target, &bytes);
            })
    });
}

#[test]
fn fuzz_unpack_dir() {
    fuzz_unpack("unpack-dir", Onto::Empty);
}

#[test]
fn fuzz_unpack_delta() {
    fuzz_unpack("unpack-delta", Onto::Base);
}

/// One hostile entry among harmless ones, and the error it must be refused with.
#[derive(Debug, Clone)]
enum Threat {
    ParentName(Vec<u8>),
    AbsoluteName,
    ThroughArchivedSymlink(Vec<u8>),
    ThroughBaseSymlink(&'static [u8]),
    HardLinkOut(Vec<u8>),
    Device(u8, u64, u64),
    SetId(u8, u64),
    PrivilegedXattr(&'static [u8]),
    PaxKey(&'static [u8]),
    LongName(usize),
    LargePax,
    Unsupported(u8),
    NotADirectory(&'static [u8], u8),
    RemovalOutsideDelta,
    /// A directory entry, then, in the same delta, something else at its path or its
    /// parent's: a symlink (the directory's metadata would follow it) or not.
    ReplacedDirectory {
        parent: bool,
        symlink: bool,
        mode: u64,
    },
}

fn threat() -> impl Strategy<Value = Threat> {
    prop_oneof![
        select(vec![
            &b"../x"[..],
            b"a/../../x",
            b"..",
            b"a/..",
            b"./../x",
            b"x/../.."
        ])
        .prop_map(|n| Threat::ParentName(n.to_vec())),
        Just(Threat::AbsoluteName),
        select(vec![&b"../outside"[..], b"@OUTSIDE@", b"/", b".."])
            .prop_map(|t| Threat::ThroughArchivedSymlink(t.to_vec())),
        select(vec![
            &b"link-out/x"[..],
            b"link-abs/x",
            b"link-vdir/x",
            b"link-out/vdir/x",
            b"link-sibling/x"
        ])
        .prop_map(Threat::ThroughBaseSymlink),
        select(vec![
            &b"../outside/victim"[..],
            b"@OUTSIDE@/victim",
            b"a/../../outside/victim",
            b"/etc/passwd"
        ])
        .prop_map(|t| Threat::HardLinkOut(t.to_vec())),
        (select(vec![b'3', b'4']), 0u64..300, 0u64..300)
            .prop_filter("a whiteout is allowed", |(k, a, b)| !(*k == b'3'
                && *a == 0
                && *b == 0))
            .prop_map(|(k, a, b)| Threat::Device(k, a, b)),
        (
            select(vec![b'0', b'6', b'7', b'\0']),
            select(vec![0o4000u64, 0o2000, 0o6755, 0o7777])
        )
            .prop_map(|(k, m)| Threat::SetId(k, m)),
        select(vec![
            &b"SCHILY.xattr.security.capability"[..],
            b"SCHILY.xattr.trusted.evil",
            b"LIBARCHIVE.xattr.trusted.x"
        ])
        .prop_map(Threat::PrivilegedXattr),
        select(vec![
            &b"path"[..],
            b"linkpath",
            b"size",
            b"uid",
            b"GNU.sparse.map",
            b"comment"
        ])
        .prop_map(Threat::PaxKey),
        (4097usize..9000).prop_map(Threat::LongName),
        Just(Threat::LargePax),
        select(vec![b'V', b'M', b'N', b'g', b'D', b'A']).prop_map(Threat::Unsupported),
        (
            select(vec![&b""[..], b".", b"./"]),
            select(vec![b'0', b'2', b'6'])
        )
            .prop_map(|(n, k)| Threat::NotADirectory(n, k)),
        Just(Threat::RemovalOutsideDelta),
        (
            any::<bool>(),
            any::<bool>(),
            select(vec![0o755u64, 0o777, 0o2775, 0o6755])
        )
            .prop_map(|(parent, symlink, mode)| Threat::ReplacedDirectory {
                parent,
                symlink,
                mode
            }),
    ]
}

impl Threat {
    /// The entries that make the threat, and what it must be refused with onto each kind of
    /// destination (`None`: not a threat there).
    fn entries(&self) -> (Vec<Raw>, Option<&'static str>, Option<&'static str>) {
        let e = |name: &[u8], kind: u8| Raw::plain(name, kind);
        let both = |v| (Some(v), Some(v));
        let (entries, (empty, base)) = match self {
            Threat::ParentName(name) => (vec![e(name, b'0')], both("UnsafePath")),
            Threat::AbsoluteName => (vec![e(b"@OUTSIDE@/new", b'0')], both("UnsafePath")),
            Threat::ThroughArchivedSymlink(target) => (
                vec![e(b"s", b'2').link(target), e(b"s/x", b'0')],
                both("UnsafePath"),
            ),
            Threat::ThroughBaseSymlink(name) => (vec![e(name, b'0')], (None, Some("UnsafePath"))),
            Threat::HardLinkOut(target) => (vec![e(b"h", b'1').link(target)], both("UnsafePath")),
            Threat::Device(kind, major, minor) => (
                vec![e(b"node", *kind).dev(*major, *minor)],
                both("Privileged"),
            ),
            Threat::SetId(kind, mode) => (vec![e(b"su", *kind).mode(*mode)], both("Privileged")),
            Threat::PrivilegedXattr(key) => {
                (vec![e(b"f", b'0').pax(key, b"AQ==")], both("Privileged"))
            }
            Threat::PaxKey(key) => (vec![e(b"f", b'0').pax(key, b"1")], both("Bounds")),
            Threat::LongName(len) => (vec![e(&vec![b'n'; *len], b'0')], both("Bounds")),
            Threat::LargePax => (
                vec![e(b"f", b'0').pax(b"SCHILY.xattr.user.big", &vec![b'v'; 400 << 10])],
                both("Bounds"),
            ),
            Threat::Unsupported(kind) => (vec![e(b"u", *kind)], both("Unsupported")),
            Threat::NotADirectory(name, kind) => {
                (vec![e(name, *kind).link(b"x")], both("UnsafePath"))
            }
            Threat::RemovalOutsideDelta => (
                vec![e(b"file", b'0').pax(b"MIGRATE.remove", b"1")],
                (Some("Malformed"), None),
            ),
            Threat::ReplacedDirectory {
                parent,
                symlink,
                mode,
            } => {
                let replacement = if *symlink {
                    e(b"r", b'2').link(b"../outside")
                } else {
                    e(b"r", b'0').mode(0o755)
                };
                let mut entries = vec![e(b"r/", b'5').mode(0o755)];
                if *parent {
                    // `vdir` exists outside.
                    entries.push(e(b"r/vdir/", b'5').mode(*mode));
                } else {
                    entries[0] = e(b"r/", b'5').mode(*mode);
                }
                entries.push(replacement);
                let base = if *symlink { "UnsafePath" } else { "Malformed" };
                (entries, (Some("Create"), Some(base)))
            }
        };
        (entries, empty, base)
    }
}

/// Harmless entries around the threat, each with a name of its own.
fn harmless(count: usize, tag: &str) -> Vec<Raw> {
    (0..count)
        .map(|i| match i % 3 {
            0 => Raw::plain(format!("ok-{tag}{i}").as_bytes(), b'0'),
            1 => Raw::plain(format!("okdir-{tag}{i}/").as_bytes(), b'5').mode(0o755),
            _ => Raw::plain(format!("oklink-{tag}{i}").as_bytes(), b'2').link(b"ok"),
        })
        .collect()
}

/// Each kind of hostile entry, wherever it stands in an archive, is refused with the error
/// that names it, under the default policy, and nothing escapes.
#[test]
fn fuzz_hostile_entries_are_refused_by_name() {
    let scratch = Scratch::new();
    let outside = scratch.outside_bytes();
    let policy = UnpackPolicy::default();
    let strategy = (threat(), 0usize..5, 0usize..4, any::<bool>());
    fuzz_support::fuzz(
        "hostile-verdicts",
        strategy,
        |(threat, before, after, delta)| {
            let (threat_entries, empty, base) = threat.entries();
            let mut entries = harmless(before, "a");
            entries.extend(threat_entries);
            entries.extend(harmless(after, "b"));
            let bytes = build(&entries, Ending::Marker, &outside);
            let onto = if delta { Onto::Base } else { Onto::Empty };
            let result = unpack_and_check(&scratch, &bytes, onto, &policy)?;
            let want = if delta { base } else { empty };
            match (want, &result) {
                (None, _) => {}
                (Some(name), Err(err)) if variant(err) == name => {}
                (Some(name), _) => {
                    return Err(TestCaseError::fail(format!(
                        "{threat:?} onto {onto:?}: expected {name}, got {result:?}"
                    )))
                }
            }
            Ok(())
        },
    );
}

// --- Through a data stream -------------------------------------------------------------

/// What a stream's header declares, against the archive's real length.
#[derive(Debug, Clone)]
enum Declared {
    Exact,
    Less(u16),
    More(u32),
    Zero,
    Max,
}

#[derive(Debug, Clone)]
struct StreamInput {
    archive: ArchiveInput,
    declared: Declared,
    delta: bool,
    window_log: u32,
    /// Changes to the compressed bytes.
    mutations: Vec<Mutation>,
    budget: u64,
}

fn stream_input() -> impl Strategy<Value = StreamInput> {
    (
        archive_input(),
        prop_oneof![
            4 => Just(Declared::Exact),
            2 => any::<u16>().prop_map(Declared::Less),
            2 => any::<u32>().prop_map(Declared::More),
            1 => Just(Declared::Zero),
            1 => Just(Declared::Max),
        ],
        any::<bool>(),
        select(vec![10u32, 17, 20, 21, 23, 27]),
        prop_oneof![4 => Just(Vec::new()), 1 => vec(fuzz_support::mutation(), 1..3)],
        prop_oneof![4 => Just(u64::MAX), 1 => 0u64..(4 << 20)],
    )
        .prop_map(
            |(archive, declared, delta, window_log, mutations, budget)| StreamInput {
                archive,
                declared,
                delta,
                window_log,
                mutations,
                budget,
            },
        )
}

/// A connected pair of QUIC connections on loopback with fresh certificates.
async fn link(dir: &Path) -> ([quinn::Endpoint; 2], quinn::Connection, quinn::Connection) {
    use migrate_common::certs::{create_ca, issue, TlsDir};
    use migrate_common::transport;
    create_ca(&dir.join("ca")).unwrap();
    issue(&dir.join("ca"), "127.0.0.1", &dir.join("dst")).unwrap();
    issue(&dir.join("ca"), "127.0.0.1", &dir.join("src")).unwrap();
    let server = transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TlsDir::load(&dir.join("dst")).unwrap(),
    )
    .unwrap();
    let port = server.local_addr().unwrap().port();
    let accept = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        (server, conn)
    });
    let (client, conn) = transport::connect(
        &format!("127.0.0.1:{port}"),
        &TlsDir::load(&dir.join("src")).unwrap(),
    )
    .await
    .unwrap();
    let (server, server_conn) = accept.await.unwrap();
    ([client, server], conn, server_conn)
}

fn compress(raw: &[u8], window_log: u32) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    encoder.window_log(window_log).unwrap();
    encoder.write_all(raw).unwrap();
    encoder.finish().unwrap()
}

/// Archives behind a data stream: the header's declared size against the budget and the
/// content, zstd frames with any window, compressed bytes damaged; received and unpacked
/// as the destination does. On top of the unpack's checks: a stream is never taken beyond
/// what it declared or what the budget has, and one taken whole reports the content's
/// length and digest.
#[test]
fn fuzz_transfer_streams() {
    let seeds = archive_seeds();
    let scratch = Arc::new(Scratch::new());
    let outside = scratch.outside_bytes();
    let policy = UnpackPolicy::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = rt.block_on(link(certs.path()));
    fuzz_support::fuzz("transfer-streams", stream_input(), |input| {
        let raw = input.archive.build(&seeds, &outside);
        let mut wire = compress(&raw, input.window_log);
        for mutation in &input.mutations {
            mutation.apply(&mut wire, &[]);
        }
        let len = raw.len() as u64;
        let declared = match input.declared {
            Declared::Exact => len,
            Declared::Less(n) => len.saturating_sub(u64::from(n) + 1),
            Declared::More(n) => len + u64::from(n),
            Declared::Zero => 0,
            Declared::Max => u64::MAX,
        };
        let kind = if input.delta {
            StreamKind::UpperDelta
        } else {
            StreamKind::UpperDir
        };
        let header = StreamHeader {
            kind: kind as i32,
            name: String::new(),
            round: 0,
            declared_bytes: declared,
        };
        scratch.reset(input.delta);
        let (src, dst, scratch2, policy2) =
            (src.clone(), dst.clone(), scratch.clone(), policy.clone());
        let budget = input.budget;
        let delta = input.delta;
        let outcome = rt.block_on(async move {
            let sender = tokio::spawn(async move {
                let mut send = src.open_uni().await.unwrap();
                write_frame(&mut send, &header).await.unwrap();
                // The receiver may stop the stream early: that is its right.
                let _ = send.write_all(&wire).await;
                let _ = send.finish();
                let _ = send.stopped().await;
            });
            let mut recv = dst.accept_uni().await.unwrap();
            let header = transfer::read_header(&mut recv).await.unwrap();
            let dest = scratch2.dest();
            let received = transfer::receive_stream(
                recv,
                &header,
                Arc::new(ByteBudget::new(budget)),
                Arc::new(TransferStats::default()),
                move |source| {
                    let (result, peak) = peak_of(|| {
                        if delta {
                            unpack_delta(source, &dest, &policy2)
                        } else {
                            unpack_dir(source, &dest, &policy2)
                        }
                    });
                    result.map(|()| peak).map_err(TransferError::from)
                },
            )
            .await;
            sender.abort();
            received
        });
        let whole = input.mutations.is_empty();
        match &outcome {
            Ok((peak, digest)) => {
                check_after(&scratch, raw.len(), *peak, &Ok(()), &policy)?;
                ensure!(
                    digest.raw_bytes <= declared,
                    "took {} bytes of a stream declaring {declared}",
                    digest.raw_bytes
                );
                ensure!(
                    declared <= budget,
                    "took a stream declaring {declared} with a budget of {budget}"
                );
                if whole {
                    ensure!(
                        digest.raw_bytes == len
                            && digest.blake3 == blake3::hash(&raw).to_hex().as_str(),
                        "an intact stream of {len} bytes was reported as {} bytes, {}",
                        digest.raw_bytes,
                        digest.blake3
                    );
                }
            }
            Err(err) => {
                check_after(&scratch, raw.len(), 0, &Ok(()), &policy)?;
                if declared > budget {
                    ensure!(
                        matches!(err, TransferError::BudgetExceeded { .. }),
                        "a stream over the budget failed with {err:?}"
                    );
                    let left = fs::read_dir(scratch.dest()).unwrap().count();
                    let base = if input.delta { BASE_ENTRIES } else { 0 };
                    ensure!(left == base, "a refused stream left {left} entries");
                }
                if let TransferError::Archive(archive) = err {
                    if let Some(what) = untyped(archive) {
                        return Err(TestCaseError::fail(what));
                    }
                }
            }
        }
        if whole && len > declared {
            ensure!(
                outcome.is_err(),
                "a stream of {len} bytes declaring {declared} was taken"
            );
        }
        Ok(())
    });
}
