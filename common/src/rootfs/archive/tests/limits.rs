//! Archives that announce more than the unpacker may hold, or content the policy refuses:
//! each is refused before anything it announces is read or created.

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

use tar::GnuExtSparseHeader;

use super::*;
use crate::rootfs::archive::{unpack_delta, ArchiveError, ArchiveLimits, Violation};

/// A stream of `head` followed by `tail` repeated forever, counting what was read of it.
struct Endless {
    head: Vec<u8>,
    tail: Vec<u8>,
    pos: u64,
    consumed: Rc<Cell<u64>>,
}

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let head = self.head.len() as u64;
        let n = if self.pos < head {
            let rest = &self.head[self.pos as usize..];
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            n
        } else {
            let offset = ((self.pos - head) % self.tail.len() as u64) as usize;
            let rest = &self.tail[offset..];
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            n
        };
        self.pos += n as u64;
        self.consumed.set(self.pos);
        Ok(n)
    }
}

fn endless(head: Vec<u8>, tail: Vec<u8>) -> (Endless, Rc<Cell<u64>>) {
    let consumed = Rc::new(Cell::new(0));
    let stream = Endless {
        head,
        tail,
        pos: 0,
        consumed: consumed.clone(),
    };
    (stream, consumed)
}

fn header_bytes(kind: EntryType, size: u64) -> Vec<u8> {
    raw_header(b"././@LongLink", kind, b"", size)
        .as_bytes()
        .to_vec()
}

fn refused_by_the_guard(result: Result<(), ArchiveError>) -> Violation {
    match result {
        Err(ArchiveError::Bounds { violation, .. }) => violation,
        other => panic!("expected Bounds, got {other:?}"),
    }
}

fn with_limits(limits: ArchiveLimits) -> UnpackPolicy {
    UnpackPolicy { limits, ..strict() }
}

#[test]
fn long_names_and_pax_headers_over_their_limits_are_refused_before_they_are_read() {
    let dest = tempfile::tempdir().unwrap();
    for kind in [
        EntryType::GNULongName,
        EntryType::GNULongLink,
        EntryType::XHeader,
    ] {
        // A gigabyte of name that never ends: the crate would read it all into memory.
        let (stream, consumed) = endless(header_bytes(kind, 1 << 30), b"a".to_vec());
        let violation = refused_by_the_guard(unpack_dir(stream, dest.path(), &strict()));
        assert!(
            matches!(violation, Violation::TooLarge { size, .. } if size == 1 << 30),
            "{kind:?}: {violation}"
        );
        assert_eq!(consumed.get(), 512, "{kind:?} was read past its header");
    }
    // Just within the limit is fine, up to the crate's own checks.
    let name = vec![b'n'; libc::PATH_MAX as usize - 1];
    let mut builder = Builder::new(Vec::new());
    let mut header = raw_header(b"", EntryType::GNULongName, b"", name.len() as u64 + 1);
    header.set_cksum();
    builder
        .append(&header, name.as_slice().chain(&[0u8][..]))
        .unwrap();
    let archive = builder.into_inner().unwrap();
    match unpack_dir(archive.as_slice(), dest.path(), &strict()) {
        Err(ArchiveError::Decode { .. }) => {}
        other => panic!("expected the crate's complaint of a missing member, got {other:?}"),
    }
    assert!(is_empty_dir(dest.path()));
}

#[test]
fn pax_records_the_packer_never_writes_are_refused() {
    let dest = tempfile::tempdir().unwrap();
    for key in [
        "size",
        "path",
        "linkpath",
        "uid",
        "GNU.sparse.map",
        "comment",
    ] {
        let archive = single_record_archive(b"f", key, b"100");
        let violation =
            refused_by_the_guard(unpack_dir(archive.as_slice(), dest.path(), &strict()));
        assert!(
            matches!(&violation, Violation::PaxKey { key: got } if got == key),
            "{key}: {violation}"
        );
    }
    // A record whose length prefix is wrong.
    let mut builder = Builder::new(Vec::new());
    let bad = b"99 SCHILY.xattr.user.a=b\n";
    let mut header = raw_header(b"", EntryType::XHeader, b"", bad.len() as u64);
    header.set_cksum();
    builder.append(&header, &bad[..]).unwrap();
    builder
        .append(
            &raw_header(b"f", EntryType::Regular, b"", 0),
            std::io::empty(),
        )
        .unwrap();
    let archive = builder.into_inner().unwrap();
    let violation = refused_by_the_guard(unpack_dir(archive.as_slice(), dest.path(), &strict()));
    assert!(matches!(violation, Violation::PaxMalformed), "{violation}");
    assert!(is_empty_dir(dest.path()));
}

#[test]
fn an_endless_chain_of_sparse_blocks_is_cut_at_the_limit() {
    let dest = tempfile::tempdir().unwrap();
    let mut header = raw_header(b"s", EntryType::GNUSparse, b"", 0);
    let gnu = header.as_gnu_mut().unwrap();
    gnu.set_real_size(1 << 40);
    gnu.set_is_extended(true);
    header.set_cksum();
    let mut block = GnuExtSparseHeader::new();
    block.set_is_extended(true);
    let (stream, consumed) = endless(header.as_bytes().to_vec(), block.as_bytes().to_vec());
    let violation = refused_by_the_guard(unpack_dir(stream, dest.path(), &strict()));
    assert!(
        matches!(
            violation,
            Violation::TooLarge {
                what: "sparse map",
                ..
            }
        ),
        "{violation}"
    );
    let limit = ArchiveLimits::default().sparse_blocks;
    assert_eq!(consumed.get(), (limit + 2) * 512);
}

#[test]
fn entries_and_metadata_are_bounded_per_archive() {
    let dest = tempfile::tempdir().unwrap();
    let names: Vec<Vec<u8>> = (0..8)
        .map(|i| format!("{i}{}", "x".repeat(150)).into_bytes())
        .collect();
    let mut builder = Builder::new(Vec::new());
    for name in &names {
        let mut header = raw_header(b"", EntryType::GNULongName, b"", name.len() as u64 + 1);
        header.set_cksum();
        builder
            .append(&header, name.as_slice().chain(&[0u8][..]))
            .unwrap();
        builder
            .append(
                &raw_header(b"ignored", EntryType::Regular, b"", 0),
                std::io::empty(),
            )
            .unwrap();
    }
    let archive = builder.into_inner().unwrap();
    unpack_dir(archive.as_slice(), dest.path(), &strict()).unwrap();

    let few_entries = with_limits(ArchiveLimits {
        entries: 7,
        ..ArchiveLimits::default()
    });
    let scratch = tempfile::tempdir().unwrap();
    let violation =
        refused_by_the_guard(unpack_dir(archive.as_slice(), scratch.path(), &few_entries));
    assert!(
        matches!(
            violation,
            Violation::TooMany {
                what: "entries",
                limit: 7
            }
        ),
        "{violation}"
    );

    let little_metadata = with_limits(ArchiveLimits {
        metadata: 1000,
        ..ArchiveLimits::default()
    });
    let scratch = tempfile::tempdir().unwrap();
    let violation = refused_by_the_guard(unpack_dir(
        archive.as_slice(),
        scratch.path(),
        &little_metadata,
    ));
    assert!(
        matches!(violation, Violation::TooMany { limit: 1000, .. }),
        "{violation}"
    );
}

#[test]
fn directory_metadata_kept_until_the_end_is_bounded() {
    let names: Vec<String> = (0..50).map(|i| format!("dir{i}/")).collect();
    let entries: Vec<RawEntry<'_>> = names
        .iter()
        .map(|name| (name.as_bytes(), EntryType::Directory, &b""[..]))
        .collect();
    let archive = raw_archive(&entries);
    let dest = tempfile::tempdir().unwrap();
    unpack_dir(archive.as_slice(), dest.path(), &strict()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let policy = with_limits(ArchiveLimits {
        retained: 2000,
        ..ArchiveLimits::default()
    });
    match unpack_dir(archive.as_slice(), scratch.path(), &policy) {
        Err(ArchiveError::Retained { limit: 2000, .. }) => {}
        other => panic!("expected Retained, got {other:?}"),
    }
}

#[test]
fn an_xattr_the_kernel_could_not_hold_is_refused() {
    let dest = tempfile::tempdir().unwrap();
    let big = vec![b'v'; (64 << 10) + 1];
    let archive = single_record_archive(b"f", "SCHILY.xattr.user.big", &big);
    match unpack_dir(archive.as_slice(), dest.path(), &strict()) {
        Err(ArchiveError::Malformed { path, .. }) => assert_eq!(path, Path::new("f")),
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert!(is_empty_dir(dest.path()));
}

#[test]
fn strict_unpacking_refuses_what_grants_privileges_before_creating_it() {
    let dest = tempfile::tempdir().unwrap();
    let mut device = raw_header(b"null", EntryType::Char, b"", 0);
    device.set_device_major(1).unwrap();
    device.set_device_minor(3).unwrap();
    device.set_cksum();
    let mut setuid = raw_header(b"su", EntryType::Regular, b"", 0);
    setuid.set_mode(0o4755);
    setuid.set_cksum();
    for header in [device, setuid] {
        let mut builder = Builder::new(Vec::new());
        builder.append(&header, std::io::empty()).unwrap();
        let archive = builder.into_inner().unwrap();
        match unpack_dir(archive.as_slice(), dest.path(), &strict()) {
            Err(ArchiveError::Privileged { .. }) => {}
            other => panic!("expected Privileged, got {other:?}"),
        }
    }
    for xattr in [
        "SCHILY.xattr.security.capability",
        "SCHILY.xattr.trusted.evil",
    ] {
        let archive = single_record_archive(b"f", xattr, b"x");
        match unpack_delta(archive.as_slice(), dest.path(), &strict()) {
            Err(ArchiveError::Privileged { path, .. }) => assert_eq!(path, Path::new("f")),
            other => panic!("{xattr}: expected Privileged, got {other:?}"),
        }
    }
    assert!(is_empty_dir(dest.path()));

    // The same setuid file is fine for a destination that allows it.
    let mut builder = Builder::new(Vec::new());
    let mut setuid = raw_header(b"su", EntryType::Regular, b"", 0);
    setuid.set_mode(0o4755);
    setuid.set_cksum();
    builder.append(&setuid, std::io::empty()).unwrap();
    let archive = builder.into_inner().unwrap();
    unpack_dir(archive.as_slice(), dest.path(), &UnpackPolicy::privileged()).unwrap();
    let mode = fs::metadata(dest.path().join("su")).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o4755);
}

#[test]
fn a_header_with_a_bad_checksum_is_refused() {
    let dest = tempfile::tempdir().unwrap();
    let mut archive = raw_archive(&[(b"f", EntryType::Regular, b"")]);
    archive[0] ^= 1;
    let violation = refused_by_the_guard(unpack_dir(archive.as_slice(), dest.path(), &strict()));
    assert!(matches!(violation, Violation::Header(_)), "{violation}");
}
