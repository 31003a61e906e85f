//! Whole trees through [`pack_dir`] and [`unpack_dir`].

use super::*;
use crate::rootfs::archive::ArchiveError;
use crate::rootfs::snapshot::EntryKind;

#[test]
fn round_trip_without_root() {
    let src = xattr_capable_tempdir(&["user"]);
    build_unprivileged_tree(src.path());
    set_distinct_mtimes(src.path());
    let (archive, _, dst) = round_trip(src.path(), &["user"], &strict());
    let actual = observe(dst.path()).nodes;

    // Spot checks that the comparison covers what matters.
    assert!(src.path().join("socket").exists() && !dst.path().join("socket").exists());
    assert_eq!(actual[Path::new("")].mode & 0o7777, 0o751);
    assert_eq!(actual[Path::new("sticky")].mode & 0o7777, 0o1777);
    let whiteout = &actual[Path::new("a/whiteout")];
    assert_eq!(whiteout.mode & libc::S_IFMT, libc::S_IFCHR);
    assert_eq!(whiteout.rdev, 0);
    assert_eq!(actual[Path::new("fifo")].mode & libc::S_IFMT, libc::S_IFIFO);
    let xattrs = &actual[Path::new("file.txt")].xattrs;
    assert_eq!(xattrs.len(), 3);
    assert!(xattrs.contains(&(OsString::from("user.binary"), BINARY_XATTR.to_vec())));
    assert!(xattrs
        .iter()
        .any(|(name, _)| name.as_bytes() == b"user.we=ird\nna me\xff"));
    assert_eq!(actual[Path::new("emptydir")].xattrs.len(), 1);
    assert_eq!(
        actual[Path::new("dangling")].target.as_deref(),
        Some(Path::new("/nonexistent/target"))
    );
    assert!(actual.contains_key(Path::new(OsStr::from_bytes(b"caf\xe9"))));
    assert_eq!(actual[Path::new("a/hardlink")].nlink, Some(2));
    let long = long_file(Path::new("")).into_os_string();
    let group = vec![PathBuf::from("a/hardlink"), PathBuf::from(long)];
    assert!(observe(dst.path()).link_groups.contains(&group));

    for (name, max_allocated) in [
        ("sparse", ISLANDS * 8192),
        ("sparse-tail", 64 * 1024),
        ("all-hole", 0),
    ] {
        let src_blocks = fs::metadata(src.path().join(name)).unwrap().blocks() * 512;
        let dst_blocks = fs::metadata(dst.path().join(name)).unwrap().blocks() * 512;
        assert!(src_blocks <= max_allocated, "{name}: source not sparse");
        assert!(
            dst_blocks <= max_allocated,
            "{name}: {dst_blocks} bytes allocated after unpacking"
        );
    }
    // Only the data islands are stored, not 64 MiB of zeros.
    assert!((archive.len() as u64) < 2 * MIB, "{} bytes", archive.len());
}

#[test]
fn round_trip_preserves_everything() {
    require_root();
    let src = xattr_capable_tempdir(&["trusted", "user"]);
    build_unprivileged_tree(src.path());
    add_privileged_entries(src.path());
    set_distinct_mtimes(src.path());
    let (_, _, dst) = round_trip(
        src.path(),
        &["trusted", "user"],
        &UnpackPolicy::privileged(),
    );
    let actual = observe(dst.path()).nodes;

    // Spot checks that the comparison covers what matters.
    let root = &actual[Path::new("")];
    assert_eq!((root.mode & 0o7777, root.uid, root.gid), (0o751, 100, 200));
    let suid = &actual[Path::new("suid")];
    assert_eq!(
        (suid.mode & 0o7777, suid.uid, suid.gid),
        (0o4755, 1234, 5678)
    );
    let sgid = &actual[Path::new("sgid")];
    assert_eq!((sgid.mode & 0o7777, sgid.gid), (0o2750, 5678));
    assert_eq!(actual[Path::new("null")].rdev, stat::makedev(1, 3));
    let loop9 = &actual[Path::new("loop9")];
    assert_eq!(loop9.mode & libc::S_IFMT, libc::S_IFBLK);
    assert_eq!(loop9.rdev, stat::makedev(7, 9));
    assert_eq!(
        actual[Path::new("opaque")].xattrs,
        vec![(OsString::from("trusted.overlay.opaque"), b"y".to_vec())]
    );
    assert_eq!(actual[Path::new("link")].xattrs.len(), 1);
    let xattrs = &actual[Path::new("file.txt")].xattrs;
    assert_eq!(xattrs.len(), 4);
    assert!(xattrs.contains(&(
        OsString::from("trusted.overlay.origin"),
        BINARY_XATTR.to_vec()
    )));
}

#[test]
fn packing_is_deterministic() {
    let src = xattr_capable_tempdir(&["user"]);
    build_unprivileged_tree(src.path());
    assert!(pack(src.path()).0 == pack(src.path()).0);
}

#[test]
fn the_snapshot_lists_exactly_what_was_archived() {
    let src = xattr_capable_tempdir(&["user"]);
    build_unprivileged_tree(src.path());
    let (archive, snapshot) = pack(src.path());

    let archived: Vec<PathBuf> = archive_names(&archive)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        archived,
        snapshot.entries.keys().cloned().collect::<Vec<_>>()
    );
    assert!(!snapshot.entries.contains_key(Path::new("socket")));

    let link = &snapshot.entries[Path::new("a/hardlink")];
    let file = &snapshot.entries[long_file(Path::new("")).as_path()];
    assert_eq!((link.kind, link.nlink), (EntryKind::File, 2));
    assert_eq!((link.dev, link.ino), (file.dev, file.ino));
    let whiteout = &snapshot.entries[Path::new("a/whiteout")];
    assert_eq!((whiteout.kind, whiteout.rdev), (EntryKind::CharDevice, 0));
    let meta = fs::symlink_metadata(src.path().join("sparse")).unwrap();
    let sparse = &snapshot.entries[Path::new("sparse")];
    assert_eq!(
        (sparse.size, sparse.ctime.secs, sparse.ctime.nanos),
        (SPARSE_SIZE, meta.ctime(), meta.ctime_nsec() as u32)
    );
}

#[test]
fn sparse_entries_use_gnu_extension_blocks() {
    let src = xattr_capable_tempdir(&["user"]);
    build_unprivileged_tree(src.path());
    let (archive, _) = pack(src.path());
    let mut reader = tar::Archive::new(archive.as_slice());
    let entry = reader
        .entries()
        .unwrap()
        .map(Result::unwrap)
        .find(|e| e.path_bytes().as_ref() == b"sparse")
        .unwrap();
    let header = entry.header();
    assert_eq!(header.entry_type(), EntryType::GNUSparse);
    assert!(header.as_gnu().unwrap().is_extended());
    assert_eq!(header.size().unwrap(), SPARSE_SIZE);
    assert_eq!(header.entry_size().unwrap(), ISLANDS * 4096);
}

#[test]
fn awkward_xattrs_travel_in_libarchive_form() {
    let src = xattr_capable_tempdir(&["user"]);
    let file = src.path().join("f");
    fs::write(&file, b"").unwrap();
    let name = OsStr::from_bytes(b"user.a=b c%\n\xff");
    xattr::set(&file, name, b"foob").unwrap();
    let (archive, _) = pack(src.path());
    let mut reader = tar::Archive::new(archive.as_slice());
    let mut entry = reader
        .entries()
        .unwrap()
        .map(Result::unwrap)
        .find(|e| e.path_bytes().as_ref() == b"f")
        .unwrap();
    let keys: Vec<Vec<u8>> = entry
        .pax_extensions()
        .unwrap()
        .unwrap()
        .map(|r| r.unwrap().key_bytes().to_vec())
        .collect();
    assert_eq!(keys, [b"LIBARCHIVE.xattr.user.a%3Db%20c%25%0A%FF".to_vec()]);
    let dst = xattr_capable_tempdir(&["user"]);
    unpack_dir(archive.as_slice(), dst.path(), &strict()).unwrap();
    assert_eq!(
        xattr::get(dst.path().join("f"), name).unwrap(),
        Some(b"foob".to_vec())
    );

    // Padded values, which libarchive also reads, come back the same; broken ones are
    // refused with the decoder's reason.
    let padded = single_record_archive(b"g", "LIBARCHIVE.xattr.user.padded", b"Zm9vYg==");
    unpack_dir(padded.as_slice(), dst.path(), &strict()).unwrap();
    assert_eq!(
        xattr::get(dst.path().join("g"), "user.padded").unwrap(),
        Some(b"foob".to_vec())
    );
    let broken = single_record_archive(b"h", "LIBARCHIVE.xattr.user.broken", b"Zm9vY");
    match unpack_dir(broken.as_slice(), dst.path(), &strict()) {
        Err(ArchiveError::Decode { path, source }) => {
            assert_eq!(path, Path::new("h"));
            assert_eq!(source.kind(), std::io::ErrorKind::InvalidData);
        }
        other => panic!("expected Decode, got {other:?}"),
    }
}
