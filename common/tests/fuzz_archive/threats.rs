//! One hostile entry among harmless ones, refused with its own `ArchiveError` variant.

#![allow(clippy::unwrap_used)]

use super::*;

/// One hostile entry among harmless ones, and the error it must be refused with.
#[derive(Debug, Clone)]
pub(crate) enum Threat {
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

pub(crate) fn threat() -> impl Strategy<Value = Threat> {
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
    pub(crate) fn entries(&self) -> (Vec<Raw>, Option<&'static str>, Option<&'static str>) {
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
pub(crate) fn harmless(count: usize, tag: &str) -> Vec<Raw> {
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
pub(crate) fn fuzz_hostile_entries_are_refused_by_name() {
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
