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
#[path = "../fuzz_support/mod.rs"]
mod fuzz_support;

mod scratch;
mod seeds;
mod strategies;
mod streams;
mod tar;
mod threats;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use migrate_common::protocol::{write_frame, StreamCodec, StreamHeader, StreamKind};
use migrate_common::rootfs::archive::{
    pack_delta, pack_dir, unpack_delta, unpack_dir, ArchiveError, ArchiveLimits, UnpackPolicy,
};
use migrate_common::transfer::{self, ByteBudget, TransferError, TransferStats};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;

use fuzz_support::{peak_of, Mutation};

use scratch::*;
use seeds::*;
use strategies::*;
use tar::*;

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
