//! The seed corpus: archives of a real tree, deltas, and hostile archives, written to `common/fuzz/corpus/archive/`.

#![allow(clippy::unwrap_used)]

use super::*;

pub(crate) fn archive_seeds() -> Vec<Vec<u8>> {
    fuzz_support::corpus("archive")
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect()
}

// --- The seed corpus -------------------------------------------------------------------

/// A tree with one of each kind of entry: long names and link targets, xattrs (binary ones
/// too), a hard link, a FIFO, a whiteout, a setgid directory and a sparse file with enough
/// holes for extension blocks; every mtime fixed.
pub(crate) fn build_tree(root: &Path) {
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
pub(crate) fn fix_mtimes(dir: &Path) {
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
pub(crate) struct Hostile {
    pub(crate) name: &'static str,
    pub(crate) entries: Vec<Raw>,
    pub(crate) empty: Option<&'static str>,
    pub(crate) base: Option<&'static str>,
}

pub(crate) fn hostile_seeds() -> Vec<Hostile> {
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
pub(crate) fn archive_corpus() -> Vec<(String, Vec<u8>)> {
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
