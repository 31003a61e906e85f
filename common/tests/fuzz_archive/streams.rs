//! Archives behind a data stream: declared sizes, zstd windows or no compression, and byte
//! budgets.

#![allow(clippy::unwrap_used)]

use super::*;

/// What a stream's header declares, against the archive's real length.
#[derive(Debug, Clone)]
pub(crate) enum Declared {
    Exact,
    Less(u16),
    More(u32),
    Zero,
    Max,
}

#[derive(Debug, Clone)]
pub(crate) struct StreamInput {
    pub(crate) archive: ArchiveInput,
    pub(crate) declared: Declared,
    pub(crate) delta: bool,
    pub(crate) window_log: u32,
    /// Changes to the bytes on the wire.
    pub(crate) mutations: Vec<Mutation>,
    pub(crate) budget: u64,
    /// Sent as it is, under codec `None`, instead of zstd-compressed.
    pub(crate) uncompressed: bool,
}

pub(crate) fn stream_input() -> impl Strategy<Value = StreamInput> {
    (
        archive_input(),
        prop_oneof![
            4 => Just(Declared::Exact),
            2 => any::<u16>().prop_map(Declared::Less),
            2 => any::<u32>().prop_map(Declared::More),
            1 => Just(Declared::Zero),
            1 => Just(Declared::Max),
        ],
        any::<bool>(),
        select(vec![10u32, 17, 20, 21, 23, 27]),
        prop_oneof![4 => Just(Vec::new()), 1 => vec(fuzz_support::mutation(), 1..3)],
        prop_oneof![4 => Just(u64::MAX), 1 => 0u64..(4 << 20)],
        // Last, so that the kept regression seeds draw the fields before it as they did.
        prop_oneof![3 => Just(false), 1 => Just(true)],
    )
        .prop_map(
            |(archive, declared, delta, window_log, mutations, budget, uncompressed)| StreamInput {
                archive,
                declared,
                delta,
                window_log,
                mutations,
                budget,
                uncompressed,
            },
        )
}

/// A connected pair of QUIC connections on loopback with fresh certificates.
async fn link(dir: &Path) -> ([quinn::Endpoint; 2], quinn::Connection, quinn::Connection) {
    use migrate_common::certs::{create_ca, issue, TlsDir};
    use migrate_common::transport;
    create_ca(&dir.join("ca")).unwrap();
    issue(&dir.join("ca"), "127.0.0.1", &dir.join("dst")).unwrap();
    issue(&dir.join("ca"), "127.0.0.1", &dir.join("src")).unwrap();
    let server = transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TlsDir::load(&dir.join("dst")).unwrap(),
    )
    .unwrap();
    let port = server.local_addr().unwrap().port();
    let accept = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        (server, conn)
    });
    let (client, conn) = transport::connect(
        &format!("127.0.0.1:{port}"),
        &TlsDir::load(&dir.join("src")).unwrap(),
    )
    .await
    .unwrap();
    let (server, server_conn) = accept.await.unwrap();
    ([client, server], conn, server_conn)
}

pub(crate) fn compress(raw: &[u8], window_log: u32) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    encoder.window_log(window_log).unwrap();
    encoder.write_all(raw).unwrap();
    encoder.finish().unwrap()
}

/// Archives behind a data stream: the header's declared size against the budget and the
/// content, zstd frames with any window, compressed bytes damaged; received and unpacked
/// as the destination does. On top of the unpack's checks: a stream is never taken beyond
/// what it declared or what the budget has, and one taken whole reports the content's
/// length and digest.
#[test]
pub(crate) fn fuzz_transfer_streams() {
    let seeds = archive_seeds();
    let scratch = Arc::new(Scratch::new());
    let outside = scratch.outside_bytes();
    let policy = UnpackPolicy::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = rt.block_on(link(certs.path()));
    fuzz_support::fuzz("transfer-streams", stream_input(), |input| {
        let raw = input.archive.build(&seeds, &outside);
        let mut wire = if input.uncompressed {
            raw.clone()
        } else {
            compress(&raw, input.window_log)
        };
        for mutation in &input.mutations {
            mutation.apply(&mut wire, &[]);
        }
        let len = raw.len() as u64;
        let declared = match input.declared {
            Declared::Exact => len,
            Declared::Less(n) => len.saturating_sub(u64::from(n) + 1),
            Declared::More(n) => len + u64::from(n),
            Declared::Zero => 0,
            Declared::Max => u64::MAX,
        };
        let kind = if input.delta {
            StreamKind::UpperDelta
        } else {
            StreamKind::UpperDir
        };
        let header = StreamHeader {
            kind: kind as i32,
            name: String::new(),
            round: 0,
            declared_bytes: declared,
            offset: 0,
            codec: if input.uncompressed {
                StreamCodec::None
            } else {
                StreamCodec::Zstd
            } as i32,
        };
        scratch.reset(input.delta);
        let (src, dst, scratch2, policy2) =
            (src.clone(), dst.clone(), scratch.clone(), policy.clone());
        let budget = input.budget;
        let delta = input.delta;
        let outcome = rt.block_on(async move {
            let sender = tokio::spawn(async move {
                let mut send = src.open_uni().await.unwrap();
                write_frame(&mut send, &header).await.unwrap();
                // The receiver may stop the stream early: that is its right.
                let _ = send.write_all(&wire).await;
                let _ = send.finish();
                let _ = send.stopped().await;
            });
            let mut recv = dst.accept_uni().await.unwrap();
            let header = transfer::read_header(&mut recv).await.unwrap();
            let dest = scratch2.dest();
            let received = transfer::receive_stream(
                recv,
                &header,
                Arc::new(ByteBudget::new(budget)),
                Arc::new(TransferStats::default()),
                move |source| {
                    let (result, peak) = peak_of(|| {
                        if delta {
                            unpack_delta(source, &dest, &policy2)
                        } else {
                            unpack_dir(source, &dest, &policy2)
                        }
                    });
                    result.map(|()| peak).map_err(TransferError::from)
                },
            )
            .await;
            sender.abort();
            received
        });
        let whole = input.mutations.is_empty();
        match &outcome {
            Ok((peak, digest)) => {
                check_after(&scratch, raw.len(), *peak, &Ok(()), &policy)?;
                ensure!(
                    digest.raw_bytes <= declared,
                    "took {} bytes of a stream declaring {declared}",
                    digest.raw_bytes
                );
                ensure!(
                    declared <= budget,
                    "took a stream declaring {declared} with a budget of {budget}"
                );
                if whole {
                    ensure!(
                        digest.raw_bytes == len
                            && digest.blake3 == blake3::hash(&raw).to_hex().as_str(),
                        "an intact stream of {len} bytes was reported as {} bytes, {}",
                        digest.raw_bytes,
                        digest.blake3
                    );
                }
            }
            Err(err) => {
                check_after(&scratch, raw.len(), 0, &Ok(()), &policy)?;
                if declared > budget {
                    ensure!(
                        matches!(err, TransferError::BudgetExceeded { .. }),
                        "a stream over the budget failed with {err:?}"
                    );
                    let left = fs::read_dir(scratch.dest()).unwrap().count();
                    let base = if input.delta { BASE_ENTRIES } else { 0 };
                    ensure!(left == base, "a refused stream left {left} entries");
                }
                if let TransferError::Archive(archive) = err {
                    if let Some(what) = untyped(archive) {
                        return Err(TestCaseError::fail(what));
                    }
                }
            }
        }
        if whole && len > declared {
            ensure!(
                outcome.is_err(),
                "a stream of {len} bytes declaring {declared} was taken"
            );
        }
        Ok(())
    });
}
