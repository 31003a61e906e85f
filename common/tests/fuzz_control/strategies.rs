//! The proptest strategies: every control message with any field values, and mutated frame sequences.

#![allow(clippy::unwrap_used)]

use super::*;

pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => vec(any::<char>(), 0..12).prop_map(String::from_iter),
        1 => (0usize..300, any::<char>()).prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
    ]
}

/// Mostly the values an enumeration has, sometimes any.
pub(crate) fn enumeration(max: i32) -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0..=max, 1 => any::<i32>()]
}

pub(crate) fn file_digests() -> impl Strategy<Value = Vec<FileDigest>> {
    let one = (
        enumeration(5),
        text(),
        any::<u64>(),
        text(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(kind, name, raw_bytes, blake3, round, offset)| FileDigest {
                kind,
                name,
                raw_bytes,
                blake3,
                round,
                offset,
            },
        );
    vec(one, 0..6)
}

pub(crate) fn restored() -> impl Strategy<Value = Restored> {
    (any::<u64>(), any::<u32>()).prop_map(|(restore_ms, pid)| Restored { restore_ms, pid })
}

pub(crate) fn pages_complete() -> impl Strategy<Value = PagesComplete> {
    (any::<u64>(), any::<u64>()).prop_map(|(pages, after_restore_ms)| PagesComplete {
        pages,
        after_restore_ms,
    })
}

pub(crate) fn failed() -> impl Strategy<Value = Failed> {
    (text(), text(), text()).prop_map(|(stage, message, criu_log_tail)| Failed {
        stage,
        message,
        criu_log_tail,
    })
}

pub(crate) fn preflight_checks() -> impl Strategy<Value = Vec<PreflightCheck>> {
    let one = (text(), any::<bool>(), text()).prop_map(|(name, ok, detail)| PreflightCheck {
        name,
        ok,
        detail,
    });
    vec(one, 0..16)
}

/// A network identity, every field any value (the destination's checks
/// see what a source could send).
pub(crate) fn network_identity() -> impl Strategy<Value = Option<NetworkIdentity>> {
    let interface = (
        text(),
        text(),
        any::<u32>(),
        vec(text(), 0..3),
        text(),
        text(),
    )
        .prop_map(
            |(name, mac, mtu, addresses, bridge, host_peer)| NetInterface {
                name,
                mac,
                mtu,
                addresses,
                bridge,
                host_peer,
            },
        );
    let route = (text(), text(), text()).prop_map(|(destination, gateway, device)| NetRoute {
        destination,
        gateway,
        device,
    });
    proptest::option::of(
        (vec(interface, 0..3), vec(route, 0..3))
            .prop_map(|(interfaces, routes)| NetworkIdentity { interfaces, routes }),
    )
}

/// Any control message, every field any value.
pub(crate) fn message() -> impl Strategy<Value = ControlMessage> {
    let layers = vec(
        (text(), any::<u64>()).prop_map(|(digest, size_bytes)| LayerInfo { digest, size_bytes }),
        0..4,
    );
    let hello = (
        any::<u32>(),
        text(),
        text(),
        layers,
        (any::<u64>(), any::<u64>()),
        text(),
        any::<bool>(),
        enumeration(4),
        text(),
        (
            vec(text(), 0..3),
            any::<bool>(),
            vec(any::<u8>(), 0..256),
            network_identity(),
        ),
    )
        .prop_map(
            |(
                protocol_version,
                container_id,
                config_json,
                layers,
                sizes,
                criu,
                tcp,
                mode,
                id,
                (criu_options, preflight_only, cpuinfo, network),
            )| {
                ControlMessage::from(Hello {
                    protocol_version,
                    container_id,
                    config_json,
                    layers,
                    upper_bytes: sizes.0,
                    memory_bytes: sizes.1,
                    source_criu_version: criu,
                    tcp_established: tcp,
                    mode,
                    migration_id: id,
                    criu_options,
                    preflight_only,
                    cpuinfo,
                    network,
                })
            },
        );
    let reply = (
        any::<bool>(),
        vec(text(), 0..4),
        (text(), text()),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        vec(text(), 0..4),
        text(),
        (any::<bool>(), text()),
        preflight_checks(),
    )
        .prop_map(
            |(
                accepted,
                refusals,
                versions,
                room,
                missing_layers,
                hostname,
                (lazy, why),
                checks,
            )| {
                ControlMessage::from(PreflightReply {
                    accepted,
                    refusals,
                    criu_version: versions.0,
                    runc_version: versions.1,
                    free_bytes: room.0,
                    missing_layers,
                    hostname,
                    lazy_pages: lazy,
                    lazy_pages_problem: why,
                    mem_available_bytes: room.1,
                    checks,
                    image_free_bytes: room.2,
                })
            },
        );
    let resume = (any::<u32>(), text(), any::<u64>(), text()).prop_map(
        |(protocol_version, migration_id, tunnel_delivered, container_id)| {
            ControlMessage::from(Resume {
                protocol_version,
                migration_id,
                tunnel_delivered,
                container_id,
            })
        },
    );
    let resumed = (
        any::<u64>(),
        proptest::option::of(restored()),
        proptest::option::of(pages_complete()),
        proptest::option::of(failed()),
        proptest::option::of(any::<u64>().prop_map(|release_ms| Released { release_ms })),
        any::<bool>(),
    )
        .prop_map(
            |(tunnel_delivered, restored, pages_complete, failed, released, lazy)| {
                ControlMessage::from(Resumed {
                    tunnel_delivered,
                    restored,
                    pages_complete,
                    failed,
                    released,
                    lazy,
                })
            },
        );
    prop_oneof![
        Just(ControlMessage { body: None }),
        hello,
        reply,
        file_digests().prop_map(|files| LayersSent { files }.into()),
        Just(LayersReady {}.into()),
        (
            file_digests(),
            any::<u32>(),
            any::<bool>(),
            prop::collection::vec((text(), text()), 0..4)
        )
            .prop_map(|(files, parent_round, lazy, ends)| {
                CheckpointSent {
                    files,
                    parent_round,
                    lazy,
                    closed_connections: ends
                        .into_iter()
                        .map(|(local, remote)| TcpConnection { local, remote })
                        .collect(),
                }
                .into()
            }),
        restored().prop_map(ControlMessage::from),
        failed().prop_map(ControlMessage::from),
        Just(Commit {}.into()),
        Just(Committed {}.into()),
        text().prop_map(|reason| Abort { reason }.into()),
        (any::<u32>(), file_digests()).prop_map(|(round, files)| RoundSent { round, files }.into()),
        pages_complete().prop_map(ControlMessage::from),
        resume,
        resumed,
        Just(Release {}.into()),
        any::<u64>().prop_map(|release_ms| Released { release_ms }.into()),
        Just(Discarded {}.into()),
    ]
}

/// What a rewritten length prefix says.
#[derive(Debug, Clone)]
pub(crate) enum Prefix {
    /// Everything after the prefix is the frame.
    Rest,
    Plus(u16),
    Minus(u16),
    /// The largest frame accepted, and the smallest refused.
    Max,
    OverMax,
    U32Max,
    Value(u32),
}

/// Where the input comes from before it is changed.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    Arbitrary(Bytes),
    Seed(Index),
    Messages(Vec<ControlMessage>),
}

#[derive(Debug, Clone)]
pub(crate) struct ControlInput {
    pub(crate) source: Source,
    pub(crate) mutations: Vec<Mutation>,
    /// Which frame's prefix (counting the frames the prefixes delimit) and what it becomes.
    pub(crate) prefixes: Vec<(Index, Prefix)>,
}

pub(crate) fn control_input() -> impl Strategy<Value = ControlInput> {
    let source = prop_oneof![
        1 => vec(any::<u8>(), 0..2048).prop_map(|b| Source::Arbitrary(Bytes(b))),
        4 => any::<Index>().prop_map(Source::Seed),
        2 => vec(message(), 1..4).prop_map(Source::Messages),
    ];
    let prefix = prop_oneof![
        3 => Just(Prefix::Rest),
        1 => any::<u16>().prop_map(Prefix::Plus),
        1 => any::<u16>().prop_map(Prefix::Minus),
        1 => Just(Prefix::Max),
        1 => Just(Prefix::OverMax),
        1 => Just(Prefix::U32Max),
        1 => any::<u32>().prop_map(Prefix::Value),
    ];
    (
        source,
        vec(fuzz_support::mutation(), 0..5),
        vec((any::<Index>(), prefix), 0..3),
    )
        .prop_map(|(source, mutations, prefixes)| ControlInput {
            source,
            mutations,
            prefixes,
        })
}

/// Where each frame starts, as the prefixes delimit them.
pub(crate) fn frame_starts(input: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at + 4 <= input.len() {
        starts.push(at);
        let len = u32::from_be_bytes(input[at..at + 4].try_into().unwrap()) as usize;
        at = at.saturating_add(4).saturating_add(len);
    }
    starts
}

impl ControlInput {
    pub(crate) fn build(&self, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut input = match &self.source {
            Source::Arbitrary(bytes) => bytes.0.clone(),
            Source::Seed(index) => index.get(seeds).clone(),
            Source::Messages(messages) => messages.iter().flat_map(frame).collect(),
        };
        for mutation in &self.mutations {
            mutation.apply(&mut input, seeds);
        }
        for (which, prefix) in &self.prefixes {
            let starts = frame_starts(&input);
            if starts.is_empty() {
                break;
            }
            let at = *which.get(&starts);
            let rest = (input.len() - at - 4) as u32;
            let max = MAX_FRAME_LEN as u32;
            let len = match prefix {
                Prefix::Rest => rest,
                Prefix::Plus(n) => rest.saturating_add(u32::from(*n)),
                Prefix::Minus(n) => rest.saturating_sub(u32::from(*n)),
                Prefix::Max => max,
                Prefix::OverMax => max + 1,
                Prefix::U32Max => u32::MAX,
                Prefix::Value(v) => *v,
            };
            input[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        input
    }
}

// --- The checks ------------------------------------------------------------------------
