//! Trees packed as a base, changed, and brought up to date on the copy with [`pack_delta`]
//! and [`unpack_delta`].

use std::time::Duration;

use super::*;
use crate::rootfs::archive::{pack_delta, pack_dir_within, unpack_delta, DeltaPlan, DeltaSummary};
use crate::rootfs::delta::RACY_MARGIN;
use crate::rootfs::snapshot::EntryStat;

/// Lets the tree's timestamps fall out of the racy margin of a walk starting now, so that
/// the delta holds only what changes afterwards.
fn wait_out_racy_margin() {
    std::thread::sleep(RACY_MARGIN + Duration::from_millis(100));
}

/// Packs `src` as a base, lets `change` edit it, packs the delta, unpacks base then delta
/// into a fresh directory and checks that the copy equals `src`. Returns the delta.
fn base_then_delta(
    src: &Path,
    namespaces: &[&str],
    policy: &UnpackPolicy,
    change: impl FnOnce(&Path),
) -> (Vec<u8>, DeltaSummary, tempfile::TempDir) {
    let (base_archive, base) = pack(src);
    change(src);
    let plan = DeltaPlan::new(src, &base).unwrap();
    let planned = plan.len();
    let (delta, summary) = plan.pack(Vec::new()).unwrap();
    assert_eq!(planned, delta.len() as u64);

    let names = archive_names(&delta);
    let removals = names.iter().filter(|(_, removal)| *removal).count();
    assert_eq!(summary.removed as usize, removals);
    assert_eq!(summary.entries as usize, names.len() - removals);
    assert_eq!(summary.bytes, delta.len() as u64);

    let dst = xattr_capable_tempdir(namespaces);
    unpack_dir(base_archive.as_slice(), dst.path(), policy).unwrap();
    unpack_delta(delta.as_slice(), dst.path(), policy).unwrap();
    assert_same_tree(src, dst.path());
    (delta, summary, dst)
}

/// Every kind of change an unprivileged user can make to [`build_unprivileged_tree`].
fn change_unprivileged(root: &Path) {
    fs::write(root.join("new.txt"), b"new").unwrap();
    fs::create_dir_all(root.join("newdir/inner")).unwrap();
    fs::write(root.join("newdir/inner/file"), b"deep new").unwrap();
    let sparse = File::create(root.join("new-sparse")).unwrap();
    sparse.write_all_at(b"island", 5 * MIB).unwrap();
    sparse.set_len(8 * MIB).unwrap();

    // New content of the same size, xattrs removed, changed and added.
    fs::write(root.join("file.txt"), b"HELLO\n").unwrap();
    xattr::remove(root.join("file.txt"), "user.comment").unwrap();
    xattr::set(root.join("file.txt"), "user.binary", b"changed\n").unwrap();
    // The directory stays: the destination must drop the xattr from its copy.
    xattr::remove(root.join("a"), "user.on-a").unwrap();
    xattr::set(root.join("a"), "user.other", b"on a directory").unwrap();
    xattr::set(root, "user.root", b"on the root").unwrap();
    // Through one of two hard-linked names.
    xattr::set(root.join("a/hardlink"), "user.linked", b"both names").unwrap();

    fs::remove_file(root.join("empty")).unwrap();
    fs::remove_dir_all(root.join("a/b")).unwrap();
    // Whiteouts in place of a file and of a directory.
    let cafe = root.join(OsStr::from_bytes(b"caf\xe9"));
    fs::remove_file(&cafe).unwrap();
    mknod_at(&cafe, SFlag::S_IFCHR, 0, 0, 0);
    fs::remove_dir(root.join("emptydir")).unwrap();
    mknod_at(&root.join("emptydir"), SFlag::S_IFCHR, 0, 0, 0);
    // New names for existing files, one of them sparse.
    fs::hard_link(root.join("file.txt"), root.join("a/file-link")).unwrap();
    fs::hard_link(root.join("sparse-tail"), root.join("sticky/tail-link")).unwrap();
    // A FIFO becomes a directory; a directory with a child becomes a file.
    fs::remove_file(root.join("fifo")).unwrap();
    fs::create_dir(root.join("fifo")).unwrap();
    fs::write(root.join("fifo/child"), b"in a former fifo").unwrap();
    fs::remove_dir_all(root.join(odd_dir())).unwrap();
    fs::write(root.join(odd_dir()), b"was a directory").unwrap();
    fs::remove_file(root.join("dangling")).unwrap();
    symlink("elsewhere", root.join("dangling")).unwrap();

    chmod(&root.join("sticky"), 0o1770);
    chmod(&root.join("all-hole"), 0o4711);
    // Truncated, and still sparse.
    File::options()
        .write(true)
        .open(root.join("sparse"))
        .unwrap()
        .set_len(5 * MIB)
        .unwrap();
    let old = TimeSpec::new(1_400_000_000, 0);
    let d1 = root.join("deep/d1");
    stat::utimensat(None, &d1, &old, &old, UtimensatFlags::NoFollowSymlink).unwrap();
}

/// What only root can change in [`add_privileged_entries`].
fn change_privileged(root: &Path) {
    let suid = root.join("suid");
    unistd::chown(&suid, Some(Uid::from_raw(4321)), Some(Gid::from_raw(8765))).unwrap();
    // chown cleared the setuid bit.
    chmod(&suid, 0o6755);
    unistd::chown(root, Some(Uid::from_raw(300)), Some(Gid::from_raw(400))).unwrap();
    xattr::remove(root, "trusted.overlay.impure").unwrap();

    // An existing directory made opaque, another one no longer, a new opaque one in place
    // of a block device.
    xattr::set(root.join("sgid"), "trusted.overlay.opaque", b"y").unwrap();
    xattr::remove(root.join("opaque"), "trusted.overlay.opaque").unwrap();
    fs::write(root.join("opaque/new"), b"n").unwrap();
    fs::remove_file(root.join("loop9")).unwrap();
    fs::create_dir(root.join("loop9")).unwrap();
    xattr::set(root.join("loop9"), "trusted.overlay.opaque", b"y").unwrap();

    xattr::set(
        root.join("file.txt"),
        "trusted.overlay.origin",
        b"\x00other\n",
    )
    .unwrap();
    xattr::remove(root.join("link"), "trusted.overlay.test").unwrap();
    fs::remove_file(root.join("null")).unwrap();
    mknod_at(&root.join("null"), SFlag::S_IFCHR, 0o666, 1, 5);
}

#[test]
fn delta_round_trip_without_root() {
    let src = xattr_capable_tempdir(&["user"]);
    build_unprivileged_tree(src.path());
    set_distinct_mtimes(src.path());
    wait_out_racy_margin();
    // The changes set a setuid bit, which anyone may on their own file, and which a
    // strict destination refuses.
    let privileged = UnpackPolicy::privileged();
    let (delta, _, _) = base_then_delta(src.path(), &["user"], &privileged, change_unprivileged);

    let odd = PathBuf::from(odd_dir());
    let cafe = PathBuf::from(OsStr::from_bytes(b"caf\xe9"));
    // Deepest first, which for these unrelated paths is the reverse of the walk.
    let removed: Vec<PathBuf> = vec![
        odd.clone(),
        "fifo".into(),
        "emptydir".into(),
        "empty".into(),
        cafe.clone(),
        "a/b".into(),
    ];
    // Unchanged: a/whiteout, deep, deep/d1/d2 down to d9 (whose file is sent again through
    // its other name, so d9 must keep its mtime), link and longlink.
    let mut sent: Vec<PathBuf> = [
        "",
        "a",
        "a/file-link",
        "a/hardlink",
        "all-hole",
        "dangling",
        "deep/d1",
        "emptydir",
        "fifo",
        "fifo/child",
        "file.txt",
        "new-sparse",
        "new.txt",
        "newdir",
        "newdir/inner",
        "newdir/inner/file",
        "sparse",
        "sparse-tail",
        "sticky",
        "sticky/tail-link",
    ]
    .into_iter()
    .map(PathBuf::from)
    .chain([cafe, odd, long_file(Path::new(""))])
    .collect();
    // In the walk's order: parents before children.
    sent.sort();
    let expected: Vec<(PathBuf, bool)> = removed
        .into_iter()
        .map(|path| (path, true))
        .chain(sent.into_iter().map(|path| (path, false)))
        .collect();
    assert_eq!(archive_names(&delta), expected);

    // A second name links to the first one, which this same delta holds in full.
    let mut reader = tar::Archive::new(delta.as_slice());
    let links: Vec<(Vec<u8>, Vec<u8>)> = reader
        .entries()
        .unwrap()
        .map(Result::unwrap)
        .filter(|entry| entry.header().entry_type() == EntryType::Link)
        .map(|entry| {
            let target = entry.link_name_bytes().unwrap().into_owned();
            (entry.path_bytes().into_owned(), target)
        })
        .collect();
    let long = long_file(Path::new(""))
        .into_os_string()
        .into_encoded_bytes();
    assert_eq!(
        links,
        [
            (long, b"a/hardlink".to_vec()),
            (b"file.txt".to_vec(), b"a/file-link".to_vec()),
            (b"sticky/tail-link".to_vec(), b"sparse-tail".to_vec()),
        ]
    );
}

#[test]
fn delta_round_trip_preserves_everything() {
    require_root();
    let src = xattr_capable_tempdir(&["trusted", "user"]);
    build_unprivileged_tree(src.path());
    add_privileged_entries(src.path());
    set_distinct_mtimes(src.path());
    wait_out_racy_margin();
    let (_, _, dst) = base_then_delta(
        src.path(),
        &["trusted", "user"],
        &UnpackPolicy::privileged(),
        |root| {
            change_unprivileged(root);
            change_privileged(root);
        },
    );

    // Spot checks that the comparison covers what matters.
    let actual = observe(dst.path()).nodes;
    let root = &actual[Path::new("")];
    assert_eq!((root.uid, root.gid), (300, 400));
    assert_eq!(
        root.xattrs,
        [(OsString::from("user.root"), b"on the root".to_vec())]
    );
    let suid = &actual[Path::new("suid")];
    assert_eq!(
        (suid.mode & 0o7777, suid.uid, suid.gid),
        (0o6755, 4321, 8765)
    );
    let opaque = [(OsString::from("trusted.overlay.opaque"), b"y".to_vec())];
    assert_eq!(actual[Path::new("sgid")].xattrs, opaque);
    assert_eq!(actual[Path::new("loop9")].xattrs, opaque);
    assert!(actual[Path::new("opaque")].xattrs.is_empty());
    assert!(actual[Path::new("link")].xattrs.is_empty());
    assert_eq!(actual[Path::new("null")].rdev, stat::makedev(1, 5));
}

#[test]
fn an_unchanged_tree_gives_an_empty_delta() {
    let src = xattr_capable_tempdir(&["user"]);
    build_unprivileged_tree(src.path());
    wait_out_racy_margin();
    let (delta, summary, _) = base_then_delta(src.path(), &["user"], &strict(), |_| {});
    assert_eq!((summary.entries, summary.removed), (0, 0));
    assert!(archive_names(&delta).is_empty());
}

#[test]
fn a_file_changed_right_after_the_snapshot_is_sent_again() {
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("f");
    fs::write(&file, b"before").unwrap();
    let (base_archive, mut base) = pack(src.path());
    fs::write(&file, b"after!").unwrap();
    // With coarse timestamps the write could leave the stat exactly as the walk saw it.
    let now = EntryStat::of(&fs::symlink_metadata(&file).unwrap()).unwrap();
    base.entries.insert(PathBuf::from("f"), now);

    let (delta, _) = pack_delta(src.path(), &base, Vec::new()).unwrap();
    assert!(archive_names(&delta).contains(&(PathBuf::from("f"), false)));
    let dst = tempfile::tempdir().unwrap();
    unpack_dir(base_archive.as_slice(), dst.path(), &strict()).unwrap();
    unpack_delta(delta.as_slice(), dst.path(), &strict()).unwrap();
    assert_eq!(fs::read(dst.path().join("f")).unwrap(), b"after!");
}

#[test]
fn a_base_packed_within_a_limit_leaves_out_what_does_not_fit_for_the_delta() {
    let src = xattr_capable_tempdir(&["user"]);
    build_unprivileged_tree(src.path());
    let full = measure_dir(src.path()).unwrap();
    // Room for everything but the largest entries.
    let (base_archive, base) = pack_dir_within(src.path(), Vec::new(), full / 4).unwrap();
    assert!(base_archive.len() as u64 <= full / 4);
    let archived: Vec<PathBuf> = archive_names(&base_archive)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(archived, base.entries.keys().cloned().collect::<Vec<_>>());
    assert!(archived.len() < observe(src.path()).nodes.len() - 1);

    let (delta, _) = pack_delta(src.path(), &base, Vec::new()).unwrap();
    let dst = xattr_capable_tempdir(&["user"]);
    unpack_dir(base_archive.as_slice(), dst.path(), &strict()).unwrap();
    unpack_delta(delta.as_slice(), dst.path(), &strict()).unwrap();
    assert_same_tree(src.path(), dst.path());
}
