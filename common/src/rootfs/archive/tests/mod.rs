//! Tests that pack real trees and unpack them again, and what they share: trees holding
//! everything an upper dir can hold, and a comparison of two trees entry by entry.
//!
//! Tests that need root call [`require_root`] first: they set owners and `trusted.*` xattrs
//! and make device nodes other than 0:0. All others run unprivileged.

mod delta;
mod hostile;
mod limits;
mod round_trip;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::{self, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid, Whence};
use tar::{Builder, EntryType, Header};

use super::entry::fill_name_field;
use super::{measure_dir, pack_dir, unpack_dir, xattrs, UnpackPolicy};
use crate::rootfs::snapshot::TreeSnapshot;

const MIB: u64 = 1 << 20;
const SPARSE_SIZE: u64 = 64 * MIB;
const ISLANDS: u64 = 30;
/// A value with `\n`, `=`, NUL and non-UTF-8 bytes, like overlayfs's binary xattrs.
const BINARY_XATTR: &[u8] = b"\x00\x0a\xfb\x0a\n=\xff";

/// What a destination accepts by default.
fn strict() -> UnpackPolicy {
    UnpackPolicy::strict()
}

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
    chmod(path, perm);
}

fn chmod(path: &Path, perm: u32) {
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

/// Where [`build_unprivileged_tree`] puts a file behind a long path, hard-linked as
/// `a/hardlink`.
fn long_file(root: &Path) -> PathBuf {
    root.join("deep/d1/d2/d3/d4/d5/d6/d7/d8/d9")
        .join(long_component('n'))
}

/// The name of a directory that is not UTF-8.
fn odd_dir() -> &'static OsStr {
    OsStr::from_bytes(b"\xff\xfe-not-utf8")
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
    xattr::set(root.join("a"), "user.on-a", b"a").unwrap();
    fs::create_dir(root.join("emptydir")).unwrap();
    xattr::set(root.join("emptydir"), "user.on-a-dir", b"d").unwrap();
    symlink("file.txt", root.join("link")).unwrap();
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    let long_target = format!("../{}/{}", long_component('t'), long_component('u'));
    symlink(&long_target, root.join("longlink")).unwrap();

    let long_file = long_file(root);
    fs::create_dir_all(long_file.parent().unwrap()).unwrap();
    fs::write(&long_file, b"behind a long path").unwrap();
    // The link entry then needs a GNU long link name.
    fs::hard_link(&long_file, root.join("a/hardlink")).unwrap();
    let odd_dir = root.join(odd_dir());
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

/// Everything about an entry that unpacking must preserve.
#[derive(Debug, PartialEq)]
struct Node {
    /// Type and permission bits.
    mode: u32,
    uid: u32,
    gid: u32,
    /// Whole seconds: what the archive format keeps.
    mtime: i64,
    rdev: u64,
    /// Non-directories only: a directory's count depends on the filesystem.
    nlink: Option<u64>,
    size: Option<u64>,
    content: Option<blake3::Hash>,
    /// Regular files: the byte ranges that hold data, so that holes are compared too.
    data: Option<Vec<(u64, u64)>>,
    target: Option<PathBuf>,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// A whole tree as [`Node`]s keyed by relative path, and its hard-link groups.
#[derive(Debug)]
struct Tree {
    nodes: BTreeMap<PathBuf, Node>,
    /// The names of each multiply-linked inode, sorted.
    link_groups: BTreeSet<Vec<PathBuf>>,
}

fn observe(root: &Path) -> Tree {
    let mut nodes = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let meta = fs::symlink_metadata(&abs).unwrap();
        let file_type = meta.file_type();
        if file_type.is_dir() {
            for entry in fs::read_dir(&abs).unwrap() {
                stack.push(rel.join(entry.unwrap().file_name()));
            }
        } else if meta.nlink() > 1 {
            inodes
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(rel.clone());
        }
        let (content, data) = if file_type.is_file() {
            let file = File::open(&abs).unwrap();
            let mut hasher = blake3::Hasher::new();
            hasher.update_reader(&file).unwrap();
            (
                Some(hasher.finalize()),
                Some(data_ranges(&file, meta.len())),
            )
        } else {
            (None, None)
        };
        let is_device = file_type.is_char_device() || file_type.is_block_device();
        let node = Node {
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: meta.mtime(),
            rdev: if is_device { meta.rdev() } else { 0 },
            nlink: (!file_type.is_dir()).then_some(meta.nlink()),
            size: file_type.is_file().then_some(meta.len()),
            content,
            data,
            target: file_type.is_symlink().then(|| fs::read_link(&abs).unwrap()),
            xattrs: xattrs::read(&abs).unwrap(),
        };
        nodes.insert(rel, node);
    }
    let link_groups = inodes
        .into_values()
        .map(|mut names| {
            names.sort();
            names
        })
        .collect();
    Tree { nodes, link_groups }
}

/// The data ranges of a file as SEEK_DATA and SEEK_HOLE report them.
fn data_ranges(file: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match unistd::lseek64(fd, pos as i64, Whence::SeekData) {
            Ok(offset) => offset as u64,
            Err(Errno::ENXIO) => break,
            Err(errno) => panic!("SEEK_DATA: {errno}"),
        };
        let end = unistd::lseek64(fd, start as i64, Whence::SeekHole).unwrap() as u64;
        ranges.push((start, end));
        pos = end;
    }
    ranges
}

/// Checks that `copy` holds exactly what `source` does, sockets excepted (they are not
/// archived): the same names, each with the same [`Node`], and the same hard-link groups.
fn assert_same_tree(source: &Path, copy: &Path) {
    let mut expected = observe(source);
    expected
        .nodes
        .retain(|_, node| node.mode & libc::S_IFMT != libc::S_IFSOCK);
    let actual = observe(copy);
    assert_eq!(
        expected.nodes.keys().collect::<Vec<_>>(),
        actual.nodes.keys().collect::<Vec<_>>()
    );
    for (path, node) in &expected.nodes {
        assert_eq!(Some(node), actual.nodes.get(path), "{}", path.display());
    }
    assert_eq!(expected.link_groups, actual.link_groups);
}

fn pack(dir: &Path) -> (Vec<u8>, TreeSnapshot) {
    pack_dir(dir, Vec::new()).unwrap()
}

/// Packs `src` and unpacks it into a fresh directory, checks that everything but sockets
/// came back identical, and returns the archive, its snapshot and the copy.
fn round_trip(
    src: &Path,
    namespaces: &[&str],
    policy: &UnpackPolicy,
) -> (Vec<u8>, TreeSnapshot, tempfile::TempDir) {
    let (archive, snapshot) = pack(src);
    // What a sender declares before the stream is exactly what it writes.
    assert_eq!(measure_dir(src).unwrap(), archive.len() as u64);
    let dst = xattr_capable_tempdir(namespaces);
    unpack_dir(archive.as_slice(), dst.path(), policy).unwrap();
    assert_same_tree(src, dst.path());
    (archive, snapshot, dst)
}

/// The names in an archive as relative paths (the root's `./` as the empty path), each with
/// whether it is a removal entry.
fn archive_names(archive: &[u8]) -> Vec<(PathBuf, bool)> {
    let mut reader = tar::Archive::new(archive);
    reader
        .entries()
        .unwrap()
        .map(|entry| {
            let mut entry = entry.unwrap();
            let name = Path::new(OsStr::from_bytes(&entry.path_bytes()))
                .components()
                .filter(|c| *c != std::path::Component::CurDir)
                .collect();
            let removal = entry.pax_extensions().unwrap().is_some_and(|mut records| {
                records.any(|r| r.unwrap().key_bytes() == super::REMOVE_KEY.as_bytes())
            });
            (name, removal)
        })
        .collect()
}

/// A header with `name` and link `target` written verbatim, owned by the caller so that
/// unpacking it needs no privileges.
fn raw_header(name: &[u8], kind: EntryType, target: &[u8], size: u64) -> Header {
    let mut header = Header::new_gnu();
    fill_name_field(&mut header.as_old_mut().name, name);
    fill_name_field(&mut header.as_old_mut().linkname, target);
    header.set_entry_type(kind);
    header.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    header.set_uid(u64::from(unistd::getuid().as_raw()));
    header.set_gid(u64::from(unistd::getgid().as_raw()));
    header.set_mtime(0);
    header.set_size(size);
    header.set_cksum();
    header
}

/// An archive holding one empty file entry with one PAX record.
fn single_record_archive(name: &[u8], key: &str, value: &[u8]) -> Vec<u8> {
    let mut builder = Builder::new(Vec::new());
    builder.append_pax_extensions([(key, value)]).unwrap();
    let header = raw_header(name, EntryType::Regular, b"", 0);
    builder.append(&header, std::io::empty()).unwrap();
    builder.into_inner().unwrap()
}

/// Name, type and link target of an entry.
pub(super) type RawEntry<'a> = (&'a [u8], EntryType, &'a [u8]);

/// An archive whose names and link targets are written verbatim.
pub(super) fn raw_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
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

fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).unwrap().next().is_none()
}
