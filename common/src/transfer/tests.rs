//! Streams between two QUIC connections on loopback.

use super::*;
use crate::certs::{create_ca, issue, TlsDir};
use crate::transport;

/// A connected pair of QUIC connections on loopback with fresh
/// certificates: (both endpoints, source side, destination side).
async fn link(dir: &Path) -> ([quinn::Endpoint; 2], quinn::Connection, quinn::Connection) {
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

fn patterned(len: usize) -> Vec<u8> {
    // Compressible but not trivially so: repeating 251-byte runs.
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn files_and_streams_arrive_intact_with_matching_digests() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = link(dir.path()).await;
    let payload = patterned(3 * CHUNK + 123);
    let file = dir.path().join("pages-1.img");
    std::fs::write(&file, &payload).unwrap();
    let payload_len = payload.len() as u64;
    let generated = patterned(CHUNK / 3);

    let send_stats = Arc::new(TransferStats::default());
    let sender = {
        let (src, generated) = (src.clone(), generated.clone());
        let out = Outbound {
            stats: send_stats.clone(),
            ..Outbound::default()
        };
        tokio::spawn(async move {
            let a = send_segment(
                &src,
                &StreamId::new(StreamKind::Image, 2, "pages-1.img"),
                file,
                payload_len,
                &out,
            )
            .await
            .unwrap();
            let upper = StreamId::new(StreamKind::UpperDir, 0, "");
            let ((), b) = send_stream(&src, &upper, &out, move |sink| {
                sink.declare(generated.len() as u64)?;
                sink.write_all(&generated)
                    .map_err(|e| TransferError::io("test", e))
            })
            .await
            .unwrap();
            (a, b)
        })
    };

    let recv_stats = Arc::new(TransferStats::default());
    let budget = Arc::new(ByteBudget::new(u64::MAX));
    let out = dir.path().join("received.img");
    let mut recv = dst.accept_uni().await.unwrap();
    let header = read_header(&mut recv).await.unwrap();
    assert_eq!(
        header.id,
        StreamId::new(StreamKind::Image, 2, "pages-1.img")
    );
    assert_eq!(header.declared_bytes, payload.len() as u64);
    let got_file = receive_file(
        recv,
        &header,
        &out,
        Durability::Synced,
        &WriteTurns::default(),
        budget.clone(),
        recv_stats.clone(),
    )
    .await
    .unwrap();
    let mut recv = dst.accept_uni().await.unwrap();
    let header = read_header(&mut recv).await.unwrap();
    assert_eq!(header.id.kind, StreamKind::UpperDir);
    let (bytes, got_stream) = receive_stream(recv, &header, budget, recv_stats.clone(), |source| {
        let mut all = Vec::new();
        source
            .read_to_end(&mut all)
            .map_err(|e| TransferError::io("test", e))?;
        Ok(all)
    })
    .await
    .unwrap();

    let (sent_file, sent_stream) = sender.await.unwrap();
    assert_eq!(got_file, sent_file);
    assert_eq!(sent_file.round, 2);
    assert_eq!(got_stream, sent_stream);
    assert_eq!(sent_file.raw_bytes, payload.len() as u64);
    assert_eq!(
        sent_file.blake3,
        blake3::hash(&payload).to_hex().to_string()
    );
    assert_eq!(std::fs::read(&out).unwrap(), payload);
    assert_eq!(bytes, generated);
    assert_eq!(send_stats.raw_bytes(), recv_stats.raw_bytes());
    assert_eq!(send_stats.compressed_bytes(), recv_stats.compressed_bytes());
    assert!(
        send_stats.compressed_bytes() < send_stats.raw_bytes() / 4,
        "zstd should shrink patterned data: {} compressed for {} raw",
        send_stats.compressed_bytes(),
        send_stats.raw_bytes()
    );
}

/// Opens a data stream with `header` and sends `content` compressed after it,
/// whatever the header says: a sender that lies.
async fn send_raw(conn: &quinn::Connection, header: StreamHeader, content: &[u8]) {
    let mut send = conn.open_uni().await.unwrap();
    write_frame(&mut send, &header).await.unwrap();
    let compressed = zstd::encode_all(content, 1).unwrap();
    // The receiver may stop the stream as soon as it has seen enough.
    let _ = send.write_all(&compressed).await;
    let _ = send.finish();
}

fn image_header(declared_bytes: u64) -> StreamHeader {
    StreamHeader {
        kind: StreamKind::Image as i32,
        name: "big.img".into(),
        round: 0,
        declared_bytes,
        offset: 0,
        codec: StreamCodec::Zstd as i32,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_declared_beyond_the_budget_is_refused_before_anything_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = link(dir.path()).await;
    send_raw(&src, image_header(4 * CHUNK as u64), &[0u8; 100]).await;
    let mut recv = dst.accept_uni().await.unwrap();
    let header = read_header(&mut recv).await.unwrap();
    let budget = Arc::new(ByteBudget::new(CHUNK as u64));
    let path = dir.path().join("big.img");
    let err = receive_file(
        recv,
        &header,
        &path,
        Durability::Volatile,
        &WriteTurns::default(),
        budget.clone(),
        Arc::default(),
    )
    .await
    .unwrap_err();
    match &err {
        TransferError::BudgetExceeded {
            stream,
            declared,
            available,
            ..
        } => {
            assert_eq!(stream, "image big.img (final dump)");
            assert_eq!((*declared, *available), (4 * CHUNK as u64, CHUNK as u64));
        }
        other => panic!("expected BudgetExceeded, got {other:?}"),
    }
    assert!(
        !path.exists(),
        "nothing may be created for a refused stream"
    );
    // What a refused stream asked for stays available, and sums cannot wrap.
    assert!(budget.reserve(CHUNK as u64).is_ok());
    assert!(budget.reserve(u64::MAX).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_receiver_stops_at_the_first_byte_beyond_the_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = link(dir.path()).await;
    // Ten bytes declared, a mebibyte of zeros sent in a few compressed bytes.
    send_raw(&src, image_header(10), &vec![0u8; CHUNK]).await;
    let mut recv = dst.accept_uni().await.unwrap();
    let header = read_header(&mut recv).await.unwrap();
    let budget = Arc::new(ByteBudget::new(u64::MAX));
    let path = dir.path().join("big.img");
    let err = receive_file(
        recv,
        &header,
        &path,
        Durability::Synced,
        &WriteTurns::default(),
        budget,
        Arc::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, TransferError::Overlong { stream, declared: 10 } if stream.contains("big.img")),
        "{err:?}"
    );
    assert!(std::fs::metadata(&path).unwrap().len() <= 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_cannot_write_more_than_it_declared_nor_before_declaring() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, _dst) = link(dir.path()).await;
    let id = StreamId::new(StreamKind::UpperDir, 0, "");
    let err = send_stream(&src, &id, &Outbound::default(), |sink| {
        sink.declare(10)?;
        sink.write_all(&[1u8; 11])
            .map_err(|e| TransferError::io("writing", e))
    })
    .await
    .unwrap_err();
    let chain = format!("{err:?}");
    assert!(chain.contains("Overlong"), "{chain}");
    let err = send_stream(&src, &id, &Outbound::default(), |sink| {
        sink.write_all(b"x")
            .map_err(|e| TransferError::io("writing", e))
    })
    .await
    .unwrap_err();
    let chain = format!("{err:?}");
    assert!(chain.contains("before its size was declared"), "{chain}");
}

#[test]
fn a_frame_that_needs_a_larger_window_is_refused() {
    // 2 MiB that only a window beyond 1 MiB compresses: a random mebibyte, twice.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let random: Vec<u8> = (0..CHUNK)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let content = [random.as_slice(), random.as_slice()].concat();
    let compress = |window_log: u32| {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        encoder.window_log(window_log).unwrap();
        encoder.write_all(&content).unwrap();
        encoder.finish().unwrap()
    };
    let mut out = Vec::new();
    let err = codec::zstd_decoder(compress(WINDOW_LOG + 4).as_slice())
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err();
    assert!(err.to_string().contains("memory"), "{err}");
    out.clear();
    codec::zstd_decoder(compress(WINDOW_LOG).as_slice())
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert!(out == content);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_stream_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = link(dir.path()).await;
    let mut send = src.open_uni().await.unwrap();
    write_frame(
        &mut send,
        &StreamHeader {
            kind: 42,
            name: "x".into(),
            round: 0,
            declared_bytes: 0,
            offset: 0,
            codec: 0,
        },
    )
    .await
    .unwrap();
    send.finish().unwrap();
    let mut recv = dst.accept_uni().await.unwrap();
    assert!(matches!(
        read_header(&mut recv).await,
        Err(TransferError::UnknownKind(42))
    ));
}

/// Sends `content` uncompressed on a stream whose header says so, as a
/// sender choosing no compression does, or declares `declared` falsely.
async fn send_plain(conn: &quinn::Connection, declared_bytes: u64, content: &[u8]) {
    let mut send = conn.open_uni().await.unwrap();
    let header = StreamHeader {
        codec: StreamCodec::None as i32,
        ..image_header(declared_bytes)
    };
    write_frame(&mut send, &header).await.unwrap();
    let _ = send.write_all(content).await;
    let _ = send.finish();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uncompressed_stream_arrives_intact_and_counts_its_bytes_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = link(dir.path()).await;
    let payload = patterned(2 * CHUNK + 7);
    let file = dir.path().join("pages-1.img");
    std::fs::write(&file, &payload).unwrap();
    let send_stats = Arc::new(TransferStats::default());
    let out = Outbound {
        stats: send_stats.clone(),
        encoding: Encoding::Plain,
        throttle: None,
    };
    let id = StreamId::new(StreamKind::Image, 0, "pages-1.img");
    let conn = src.clone();
    let len = payload.len() as u64;
    let sender =
        tokio::spawn(async move { send_segment(&conn, &id, file, len, &out).await.unwrap() });

    let mut recv = dst.accept_uni().await.unwrap();
    let header = read_header(&mut recv).await.unwrap();
    assert_eq!(header.codec, StreamCodec::None);
    let recv_stats = Arc::new(TransferStats::default());
    let path = dir.path().join("received.img");
    let got = receive_file(
        recv,
        &header,
        &path,
        Durability::Volatile,
        &WriteTurns::default(),
        Arc::new(ByteBudget::new(u64::MAX)),
        recv_stats.clone(),
    )
    .await
    .unwrap();
    let sent = sender.await.unwrap();
    assert_eq!(got, sent);
    assert_eq!(sent.blake3, blake3::hash(&payload).to_hex().to_string());
    assert!(std::fs::read(&path).unwrap() == payload);
    let len = payload.len() as u64;
    for stats in [&send_stats, &recv_stats] {
        assert_eq!((stats.raw_bytes(), stats.compressed_bytes()), (len, len));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uncompressed_stream_stops_at_the_first_byte_beyond_its_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = link(dir.path()).await;
    send_plain(&src, 10, &vec![7u8; CHUNK]).await;
    let mut recv = dst.accept_uni().await.unwrap();
    let header = read_header(&mut recv).await.unwrap();
    let budget = Arc::new(ByteBudget::new(u64::MAX));
    let path = dir.path().join("big.img");
    let err = receive_file(
        recv,
        &header,
        &path,
        Durability::Volatile,
        &WriteTurns::default(),
        budget,
        Arc::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, TransferError::Overlong { declared: 10, .. }),
        "{err:?}"
    );
    assert!(std::fs::metadata(&path).unwrap().len() <= 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uncompressed_stream_is_charged_to_the_budget_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = link(dir.path()).await;
    send_plain(&src, 2 * CHUNK as u64, &[1u8; 100]).await;
    let mut recv = dst.accept_uni().await.unwrap();
    let header = read_header(&mut recv).await.unwrap();
    let path = dir.path().join("big.img");
    let err = receive_file(
        recv,
        &header,
        &path,
        Durability::Volatile,
        &WriteTurns::default(),
        Arc::new(ByteBudget::new(CHUNK as u64)),
        Arc::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, TransferError::BudgetExceeded { .. }),
        "{err:?}"
    );
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_codec_is_refused_before_the_stream_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = link(dir.path()).await;
    let header = StreamHeader {
        codec: 9,
        ..image_header(100)
    };
    let mut send = src.open_uni().await.unwrap();
    write_frame(&mut send, &header).await.unwrap();
    send.write_all(&[0u8; 100]).await.unwrap();
    send.finish().unwrap();
    let mut recv = dst.accept_uni().await.unwrap();
    assert!(matches!(
        read_header(&mut recv).await,
        Err(TransferError::UnknownCodec(9))
    ));
    // Nothing of the body was taken: it is all still there.
    let body = recv.read_to_end(1000).await.unwrap();
    assert_eq!(body.len(), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capped_stream_goes_no_faster_than_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let (_endpoints, src, dst) = link(dir.path()).await;
    let rate = 8 * CHUNK as u64;
    let out = Outbound {
        encoding: Encoding::Plain,
        throttle: Some(Arc::new(Throttle::new(rate))),
        ..Outbound::default()
    };
    let content = patterned(4 * CHUNK);
    let started = std::time::Instant::now();
    let id = StreamId::new(StreamKind::UpperDir, 0, "");
    let conn = src.clone();
    let sender = tokio::spawn(async move {
        send_stream(&conn, &id, &out, move |sink| {
            sink.declare(content.len() as u64)?;
            sink.write_all(&content)
                .map_err(|e| TransferError::io("test", e))
        })
        .await
        .unwrap()
    });
    let mut recv = dst.accept_uni().await.unwrap();
    let header = read_header(&mut recv).await.unwrap();
    receive_stream(
        recv,
        &header,
        Arc::new(ByteBudget::new(u64::MAX)),
        Arc::default(),
        |source| io::copy(source, &mut io::sink()).map_err(|e| TransferError::io("test", e)),
    )
    .await
    .unwrap();
    sender.await.unwrap();
    // Four MiB at 8 MiB/s, less the throttle's burst of a tenth of a second.
    assert!(
        started.elapsed().as_secs_f64() >= (4.0 - 0.8) / 8.0,
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn streams_into_one_file_share_its_turn_and_other_files_have_their_own() {
    let turns = WriteTurns::default();
    let pages = turns.of(Path::new("/images/0/pages-1.img"));
    assert!(Arc::ptr_eq(
        &pages,
        &turns.of(Path::new("/images/0/pages-1.img"))
    ));
    assert!(!Arc::ptr_eq(
        &pages,
        &turns.of(Path::new("/images/0/pages-2.img"))
    ));
    // Holding one file's turn does not keep another from being written.
    let _held = pages.lock().unwrap();
    assert!(turns
        .of(Path::new("/images/0/pages-2.img"))
        .try_lock()
        .is_ok());
}
