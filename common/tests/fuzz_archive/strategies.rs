//! The proptest strategies: names, entries, header changes and whole inputs, and the unpack-and-check step.

#![allow(clippy::unwrap_used)]

use super::*;

/// Names a hostile sender would try, for entries and for link targets.
pub(crate) const NAMES: &[&[u8]] = &[
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

pub(crate) const KINDS: &[u8] = b"00000011222345566677SLKxgVMDN\0";

pub(crate) const MODES: &[u64] = &[
    0o644, 0o755, 0o777, 0, 0o4755, 0o2755, 0o6777, 0o7777, 0o1777, 0o2775,
];

pub(crate) fn name() -> impl Strategy<Value = Vec<u8>> {
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

pub(crate) fn pax_records() -> impl Strategy<Value = Vec<Vec<u8>>> {
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

pub(crate) fn raw_entry() -> impl Strategy<Value = Raw> {
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

pub(crate) fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        8 => Just(Ending::Marker),
        1 => Just(Ending::OneZeroBlock),
        1 => Just(Ending::Nothing),
        1 => any::<u16>().prop_map(Ending::Torn),
    ]
}

/// A change to one header (or block) of an archive, found wherever it is.
#[derive(Debug, Clone)]
pub(crate) enum HeaderChange {
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

pub(crate) fn header_change() -> impl Strategy<Value = HeaderChange> {
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
    pub(crate) fn apply(&self, archive: &mut Vec<u8>, at: Index, outside: &[u8]) {
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
pub(crate) enum ArchiveSource {
    Seed(Index),
    Built(Vec<Raw>, Ending),
}

#[derive(Debug, Clone)]
pub(crate) struct ArchiveInput {
    pub(crate) source: ArchiveSource,
    pub(crate) changes: Vec<(Index, HeaderChange)>,
    /// After the header changes, most of the time, so that they are not caught by the
    /// checksums alone.
    pub(crate) fix_checksums: bool,
    pub(crate) mutations: Vec<Mutation>,
    /// Byte-level mutations run after the checksums were fixed, so that some are caught
    /// by them.
    pub(crate) late_mutations: Vec<Mutation>,
}

pub(crate) fn archive_input() -> impl Strategy<Value = ArchiveInput> {
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
    pub(crate) fn build(&self, seeds: &[Vec<u8>], outside: &[u8]) -> Vec<u8> {
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
pub(crate) enum Onto {
    Empty,
    Base,
}

/// Unpacks `input` as the destination does and checks everything that must hold.
pub(crate) fn unpack_and_check(
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

pub(crate) fn check_after(
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
