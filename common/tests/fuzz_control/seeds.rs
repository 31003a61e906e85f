//! The seed corpus of framed control messages, written to `common/fuzz/corpus/control/`, and the check that it is current.

#![allow(clippy::unwrap_used)]

use super::*;

pub(crate) fn frame(msg: &impl prost::Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

pub(crate) fn file_digest(kind: StreamKind, name: &str, round: u32) -> FileDigest {
    FileDigest {
        kind: kind as i32,
        name: name.into(),
        raw_bytes: 123_456,
        blake3: "ab".repeat(32),
        round,
        offset: 0,
    }
}

/// The generated seeds: one frame of every message, all of them in a row, and a data
/// stream's header.
pub(crate) fn control_seeds() -> Vec<(String, Vec<u8>)> {
    let layer = LayerInfo {
        digest: format!("b3:{}", "0f".repeat(32)),
        size_bytes: 1 << 30,
    };
    let files = vec![
        file_digest(StreamKind::Image, "pages-1.img", 0),
        file_digest(StreamKind::UpperDelta, "", 0),
        file_digest(StreamKind::Layer, &layer.digest, 0),
    ];
    let restored = Restored {
        restore_ms: 150,
        pid: 4242,
    };
    let pages = PagesComplete {
        pages: 1 << 20,
        after_restore_ms: 900,
    };
    let failed = Failed {
        stage: "restore".into(),
        message: "runc restore failed: exit status 1".into(),
        criu_log_tail: "Error (criu/cr-restore.c:1480): Can't restore\n".into(),
    };
    let config =
        r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/"},"root":{"path":"rootfs"}}"#;
    let messages: Vec<(&str, ControlMessage)> = vec![
        (
            "hello",
            Hello {
                protocol_version: PROTOCOL_VERSION,
                container_id: "web-1".into(),
                config_json: config.into(),
                layers: vec![layer.clone(), layer.clone()],
                upper_bytes: 4096,
                memory_bytes: 1 << 28,
                source_criu_version: "4.2".into(),
                tcp_established: true,
                mode: MemoryMode::Hybrid as i32,
                migration_id: "0123456789abcdef".into(),
                // Empty, so the corpus seed keeps its bytes.
                criu_options: Vec::new(),
                preflight_only: false,
                // Empty, so the corpus seed keeps its bytes.
                cpuinfo: Vec::new(),
                network: None,
            }
            .into(),
        ),
        (
            "preflight-reply",
            PreflightReply {
                accepted: false,
                refusals: vec!["no room".into(), "no criu".into()],
                criu_version: "4.2".into(),
                runc_version: "1.2.5".into(),
                free_bytes: 1 << 40,
                missing_layers: vec![layer.digest.clone()],
                hostname: "dst".into(),
                lazy_pages: false,
                lazy_pages_problem: "no userfaultfd".into(),
                // Zero, so the corpus seed keeps its bytes.
                mem_available_bytes: 0,
                // Empty, so the corpus seed keeps its bytes.
                checks: Vec::new(),
                // Zero, so the corpus seed keeps its bytes.
                image_free_bytes: 0,
            }
            .into(),
        ),
        (
            "layers-sent",
            LayersSent {
                files: files.clone(),
            }
            .into(),
        ),
        ("layers-ready", LayersReady {}.into()),
        (
            "round-sent",
            RoundSent {
                round: 3,
                files: files[..1].to_vec(),
            }
            .into(),
        ),
        (
            "checkpoint-sent",
            CheckpointSent {
                files,
                parent_round: 2,
                lazy: true,
                closed_connections: vec![TcpConnection {
                    local: "10.77.0.10:7000".into(),
                    remote: "10.77.0.200:41000".into(),
                }],
            }
            .into(),
        ),
        ("restored", restored.clone().into()),
        ("failed", failed.clone().into()),
        ("release", Release {}.into()),
        ("released", Released { release_ms: 12 }.into()),
        ("pages-complete", pages.clone().into()),
        (
            "abort",
            Abort {
                reason: "interrupted".into(),
            }
            .into(),
        ),
        ("discarded", Discarded {}.into()),
        ("commit", Commit {}.into()),
        ("committed", Committed {}.into()),
        (
            "resume",
            Resume {
                protocol_version: PROTOCOL_VERSION,
                migration_id: "0123456789abcdef".into(),
                tunnel_delivered: 1 << 33,
                container_id: "web-1".into(),
            }
            .into(),
        ),
        (
            "resumed",
            Resumed {
                tunnel_delivered: 77,
                restored: Some(restored),
                pages_complete: Some(pages),
                failed: Some(failed),
                released: Some(Released { release_ms: 3 }),
                lazy: true,
            }
            .into(),
        ),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = messages
        .iter()
        .map(|(name, msg)| (format!("{name}.bin"), frame(msg)))
        .collect();
    let all: Vec<u8> = seeds.iter().flat_map(|(_, bytes)| bytes.clone()).collect();
    seeds.push(("all-in-a-row.bin".into(), all));
    let header = StreamHeader {
        kind: StreamKind::Image as i32,
        name: "pages-1.img".into(),
        round: 1,
        declared_bytes: 1 << 30,
        offset: 0,
        codec: StreamCodec::Zstd as i32,
    };
    seeds.push(("stream-header.bin".into(), frame(&header)));
    let uncompressed = StreamHeader {
        codec: StreamCodec::None as i32,
        ..header.clone()
    };
    seeds.push((
        "stream-header-uncompressed.bin".into(),
        frame(&uncompressed),
    ));
    // What a later version might send: refused by its codec, typed.
    let unknown_codec = StreamHeader {
        codec: 15,
        ..header
    };
    seeds.push((
        "stream-header-unknown-codec.bin".into(),
        frame(&unknown_codec),
    ));
    seeds
}

/// Rewrites the generated seeds in `common/fuzz/corpus/control/` (after a format change;
/// `control_corpus_is_current` says when): `cargo test -p migrate-common --test fuzz_control
/// -- --ignored write_control_corpus`.
#[test]
#[ignore = "rewrites common/fuzz/corpus/control"]
pub(crate) fn write_control_corpus() {
    fuzz_support::write_corpus("control", &control_seeds());
}

/// The seeds on disk are what the generator makes, every seed but a kept failure is a
/// sequence of whole frames of today's messages that encode back to the same bytes, and
/// every file of the corpus, kept failures included, passes the checks unmutated.
#[test]
pub(crate) fn control_corpus_is_current() {
    let on_disk = fuzz_support::corpus("control");
    for (name, bytes) in control_seeds() {
        let found = on_disk.iter().find(|(n, _)| *n == name);
        assert!(
            found.is_some_and(|(_, b)| *b == bytes),
            "common/fuzz/corpus/control/{name} is missing or stale: run write_control_corpus"
        );
    }
    let rt = runtime();
    for (name, bytes) in &on_disk {
        if let Err(e) = check(&rt, bytes) {
            let kept = fuzz_support::keep_failure("control", bytes);
            panic!("corpus file {name}: {e} (copy at {})", kept.display());
        }
        if name.starts_with("regression-") {
            continue;
        }
        let mut rest = bytes.as_slice();
        let mut again = Vec::new();
        let header = name.starts_with("stream-header");
        while !rest.is_empty() {
            if header {
                let msg: StreamHeader = rt.block_on(read_frame(&mut rest)).unwrap().unwrap();
                rt.block_on(write_frame(&mut again, &msg)).unwrap();
            } else {
                let msg: ControlMessage = rt.block_on(read_frame(&mut rest)).unwrap().unwrap();
                assert!(msg.body.is_some(), "{name}: an empty message");
                rt.block_on(write_frame(&mut again, &msg)).unwrap();
            }
        }
        assert_eq!(&again, bytes, "{name} does not encode back to itself");
    }
}

// --- Inputs ----------------------------------------------------------------------------
