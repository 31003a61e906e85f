//! Archives a hostile sender could write: none may touch anything outside the destination.

use super::*;
use crate::rootfs::archive::{unpack_delta, ArchiveError};

fn removal_archive(name: &[u8]) -> Vec<u8> {
    single_record_archive(name, "MIGRATE.remove", b"1")
}

fn assert_refused(result: Result<(), ArchiveError>) {
    match result {
        Err(ArchiveError::UnsafePath { .. }) => {}
        other => panic!("expected UnsafePath, got {other:?}"),
    }
}

/// A scratch dir holding `dest/` and `outside/victim`, and the bytes of the victim's path.
fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let scratch = tempfile::tempdir().unwrap();
    let dest = scratch.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let outside = scratch.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"untouched").unwrap();
    (scratch, dest, outside)
}

#[test]
fn refuses_parent_and_absolute_paths() {
    let (scratch, dest, outside) = scratch();
    let absolute = outside.join("evil");
    let archives = [
        raw_archive(&[(b"../evil", EntryType::Regular, b"")]),
        raw_archive(&[(b"a/../../evil", EntryType::Regular, b"")]),
        raw_archive(&[(absolute.as_os_str().as_bytes(), EntryType::Regular, b"")]),
        raw_archive(&[(b"h", EntryType::Link, b"../outside/victim")]),
    ];
    for archive in &archives {
        assert_refused(unpack_dir(archive.as_slice(), &dest, &strict()));
        assert_refused(unpack_delta(archive.as_slice(), &dest, &strict()));
    }
    assert!(!scratch.path().join("evil").exists());
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert!(is_empty_dir(&dest));
}

#[test]
fn refuses_to_write_through_an_archived_symlink() {
    let (scratch, _, outside) = scratch();
    let target = outside.as_os_str().as_bytes();

    let cases: [&[RawEntry<'_>]; 3] = [
        &[
            (b"a", EntryType::Symlink, target),
            (b"a/x", EntryType::Regular, b""),
        ],
        &[
            (b"a", EntryType::Symlink, target),
            (b"a/sub/", EntryType::Directory, b""),
        ],
        &[
            (b"a", EntryType::Symlink, target),
            (b"h", EntryType::Link, b"a/victim"),
        ],
    ];
    for (i, entries) in cases.into_iter().enumerate() {
        let archive = raw_archive(entries);
        for delta in [false, true] {
            let dest = scratch.path().join(format!("dest{i}-{delta}"));
            fs::create_dir(&dest).unwrap();
            assert_refused(if delta {
                unpack_delta(archive.as_slice(), &dest, &strict())
            } else {
                unpack_dir(archive.as_slice(), &dest, &strict())
            });
            assert_eq!(
                fs::read_dir(&outside).unwrap().count(),
                1,
                "case {i} wrote outside"
            );
        }
    }
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"untouched");
    assert_eq!(fs::metadata(outside.join("victim")).unwrap().nlink(), 1);
}

#[test]
fn removals_stay_inside_the_destination() {
    let (_scratch, dest, outside) = scratch();
    symlink(&outside, dest.join("a")).unwrap();
    let absolute = outside.join("victim");
    let names: [&[u8]; 7] = [
        b"../outside/victim",
        b"a/../../outside/victim",
        absolute.as_os_str().as_bytes(),
        // Through a symlink already in the destination.
        b"a/victim",
        // The destination itself.
        b"./",
        b".",
        b"",
    ];
    for name in names {
        assert_refused(unpack_delta(
            removal_archive(name).as_slice(),
            &dest,
            &strict(),
        ));
    }
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"untouched");
    assert!(dest.exists());

    // Removing the symlink itself removes the link, not what it points at.
    unpack_delta(removal_archive(b"a").as_slice(), &dest, &strict()).unwrap();
    assert!(is_empty_dir(&dest));
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"untouched");
}

#[test]
fn a_delta_replaces_a_symlink_instead_of_writing_through_it() {
    let (_scratch, dest, outside) = scratch();
    symlink(outside.join("victim"), dest.join("f")).unwrap();
    symlink(&outside, dest.join("d")).unwrap();
    let archive = raw_archive(&[
        (b"f", EntryType::Regular, b""),
        (b"d/", EntryType::Directory, b""),
        (b"d/x", EntryType::Regular, b""),
    ]);
    unpack_delta(archive.as_slice(), &dest, &strict()).unwrap();
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"evil");
    assert!(fs::symlink_metadata(dest.join("d")).unwrap().is_dir());
    assert_eq!(fs::read(dest.join("d/x")).unwrap(), b"evil");
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"untouched");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
}

#[test]
fn removal_entries_belong_to_deltas_only() {
    let (_scratch, dest, _) = scratch();
    fs::write(dest.join("f"), b"kept").unwrap();
    let malformed = |result| match result {
        Err(ArchiveError::Malformed { path, .. }) => assert_eq!(path, Path::new("f")),
        other => panic!("expected Malformed, got {other:?}"),
    };
    malformed(unpack_dir(
        removal_archive(b"f").as_slice(),
        &dest,
        &strict(),
    ));
    let odd_value = single_record_archive(b"f", "MIGRATE.remove", b"yes");
    malformed(unpack_delta(odd_value.as_slice(), &dest, &strict()));
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"kept");

    // Removing what is already gone is fine.
    unpack_delta(removal_archive(b"gone/deeper").as_slice(), &dest, &strict()).unwrap();
    unpack_delta(removal_archive(b"f").as_slice(), &dest, &strict()).unwrap();
    assert!(is_empty_dir(&dest));
}

#[test]
fn refuses_unsupported_entry_types() {
    let scratch = tempfile::tempdir().unwrap();
    let archive = raw_archive(&[(b"volume", EntryType::new(b'V'), b"")]);
    match unpack_dir(archive.as_slice(), scratch.path(), &strict()) {
        Err(ArchiveError::Unsupported { kind: 'V', .. }) => {}
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// A delta whose directory entry is replaced later in the same archive, or whose parent is:
/// the directory's metadata, applied last, must not follow the symlink that took its place
/// out of the destination, nor give a file the directory's setuid bits.
#[test]
fn a_delta_cannot_apply_directory_metadata_through_what_replaced_it() {
    let (_scratch, dest, outside) = scratch();
    fs::create_dir(outside.join("vdir")).unwrap();
    let mode_of = |path: &Path| fs::symlink_metadata(path).unwrap().mode() & 0o7777;
    let (outside_mode, vdir_mode) = (mode_of(&outside), mode_of(&outside.join("vdir")));
    // Name, type, link target and mode.
    type ModedEntry<'a> = (&'a [u8], EntryType, &'a [u8], u32);
    let archive = |entries: &[ModedEntry<'_>]| {
        let mut builder = Builder::new(Vec::new());
        for &(name, kind, target, mode) in entries {
            let mut header = raw_header(name, kind, target, 0);
            header.set_mode(mode);
            header.set_cksum();
            builder.append(&header, std::io::empty()).unwrap();
        }
        builder.into_inner().unwrap()
    };
    let cases: [(&[ModedEntry<'_>], &str); 3] = [
        (
            &[
                (b"d/", EntryType::Directory, b"", 0o777),
                (b"d", EntryType::Symlink, b"../outside", 0o777),
            ],
            "UnsafePath",
        ),
        (
            &[
                (b"a/", EntryType::Directory, b"", 0o755),
                (b"a/vdir/", EntryType::Directory, b"", 0o777),
                (b"a", EntryType::Symlink, b"../outside", 0o777),
            ],
            "UnsafePath",
        ),
        (
            &[
                (b"s/", EntryType::Directory, b"", 0o6755),
                (b"s", EntryType::Regular, b"", 0o755),
            ],
            "Malformed",
        ),
    ];
    for (i, (entries, expected)) in cases.into_iter().enumerate() {
        let result = unpack_delta(archive(entries).as_slice(), &dest, &strict());
        match (&result, expected) {
            (Err(ArchiveError::UnsafePath { .. }), "UnsafePath")
            | (Err(ArchiveError::Malformed { .. }), "Malformed") => {}
            _ => panic!("case {i}: expected {expected}, got {result:?}"),
        }
        assert_eq!(mode_of(&outside), outside_mode, "case {i}");
        assert_eq!(mode_of(&outside.join("vdir")), vdir_mode, "case {i}");
    }
    assert_eq!(mode_of(&dest.join("s")) & 0o6000, 0);
}
