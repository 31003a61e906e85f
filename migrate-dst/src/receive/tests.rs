//! The inbox, its admission of streams and its verification of manifests.

use super::*;

fn digest(kind: StreamKind, name: &str, bytes: u64, hash: &str) -> FileDigest {
    StreamId::new(kind, 0, name).digest(bytes, hash.into())
}

#[test]
fn rounds_get_dirs_linked_to_their_parents() {
    let images = tempfile::tempdir().unwrap();
    let first = dump_dir(images.path(), 1).unwrap();
    assert!(!first.join("parent").exists());
    let second = dump_dir(images.path(), 2).unwrap();
    assert_eq!(
        std::fs::read_link(second.join("parent")).unwrap(),
        Path::new("../1")
    );
    assert!(second.join("parent").is_dir());
    // Asking again (parallel streams of one round) is fine.
    dump_dir(images.path(), 2).unwrap();
    let last = dump_dir(images.path(), 0).unwrap();
    assert_eq!(last, images.path().join("final"));
    link_parent(&last, 2).unwrap();
    assert_eq!(
        std::fs::read_link(last.join("parent")).unwrap(),
        Path::new("../2")
    );
    assert!(
        link_parent(&last, 1).is_err(),
        "a different parent is refused"
    );
    assert!(dump_dir(images.path(), MAX_ROUNDS + 1).is_err());
}

#[test]
fn image_names_must_be_plain() {
    let dir = Path::new("/s/images");
    assert_eq!(
        image_path(dir, "pages-1.img").unwrap(),
        dir.join("pages-1.img")
    );
    for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd", "parent"] {
        assert!(image_path(dir, bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn verify_waits_for_every_file_and_compares() {
    let inbox = Arc::new(Inbox::new(&Hello::default(), UnpackPolicy::strict()));
    let manifest = vec![
        digest(StreamKind::Image, "a.img", 3, "aa"),
        digest(StreamKind::UpperDir, "", 9, "bb"),
    ];
    let waiter = {
        let inbox = inbox.clone();
        let manifest = manifest.clone();
        tokio::spawn(async move { inbox.verify(&manifest).await })
    };
    inbox.record(StreamId::of(&manifest[0]), Ok(manifest[0].clone()));
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    inbox.record(StreamId::of(&manifest[1]), Ok(manifest[1].clone()));
    waiter.await.unwrap().unwrap();
}

#[tokio::test]
async fn verify_reports_corruption_and_failed_streams() {
    let inbox = Inbox::new(&Hello::default(), UnpackPolicy::strict());
    let sent = digest(StreamKind::Image, "a.img", 3, "aa");
    inbox.record(
        StreamId::of(&sent),
        Ok(digest(StreamKind::Image, "a.img", 3, "ab")),
    );
    let err = inbox.verify(std::slice::from_ref(&sent)).await.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");

    let inbox = Inbox::new(&Hello::default(), UnpackPolicy::strict());
    inbox.record(StreamId::of(&sent), Ok(sent.clone()));
    inbox.record(
        StreamId::new(StreamKind::Image, 0, "evil"),
        Err("refused".into()),
    );
    let err = inbox.verify(&[sent]).await.unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
}

/// One migration's receiving side on loopback QUIC, and the source's connection to it.
struct Rig {
    _dir: tempfile::TempDir,
    _endpoints: [quinn::Endpoint; 2],
    src: quinn::Connection,
    inbox: Arc<Inbox>,
    store: Arc<LayerStore>,
    images: PathBuf,
    upper: PathBuf,
}

async fn rig(hello: Hello, policy: UnpackPolicy, layers: &[&str]) -> Rig {
    let unbounded = Budgets {
        disk: Arc::new(ByteBudget::new(u64::MAX)),
        images: Arc::new(ByteBudget::new(u64::MAX)),
    };
    rig_within(hello, policy, layers, unbounded).await
}

async fn rig_within(hello: Hello, policy: UnpackPolicy, layers: &[&str], budgets: Budgets) -> Rig {
    use migrate_common::certs::{create_ca, issue, TlsDir};
    use migrate_common::transport;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    create_ca(&path.join("ca")).unwrap();
    issue(&path.join("ca"), "127.0.0.1", &path.join("dst")).unwrap();
    issue(&path.join("ca"), "127.0.0.1", &path.join("src")).unwrap();
    let server = transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TlsDir::load(&path.join("dst")).unwrap(),
    )
    .unwrap();
    let port = server.local_addr().unwrap().port();
    let accept = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        (server, conn)
    });
    let tls = TlsDir::load(&path.join("src")).unwrap();
    let (client, src) = transport::connect(&format!("127.0.0.1:{port}"), &tls)
        .await
        .unwrap();
    let (server, dst) = accept.await.unwrap();

    let inbox = Arc::new(Inbox::new(&hello, policy));
    let (images, upper) = (path.join("images"), path.join("upper"));
    std::fs::create_dir(&images).unwrap();
    std::fs::create_dir(&upper).unwrap();
    {
        let mut targets = inbox.targets.lock().unwrap();
        targets.layers.extend(layers.iter().map(|l| l.to_string()));
        targets.images = Some(images);
        targets.upper = Some(upper.clone());
    }
    let store = Arc::new(LayerStore::open(path.join("layers")).unwrap());
    tokio::spawn(accept_streams(
        dst,
        inbox.clone(),
        store.clone(),
        budgets,
        Arc::default(),
    ));
    Rig {
        _endpoints: [client, server],
        src,
        inbox,
        store,
        images: path.join("images"),
        upper,
        _dir: dir,
    }
}

/// Sends `dir` as the source does a layer or the upper dir.
async fn send_tree(conn: &quinn::Connection, id: StreamId, dir: &Path) -> FileDigest {
    use migrate_common::rootfs::archive::{measure_dir, pack_dir};
    let dir = dir.to_owned();
    let ((), digest) = transfer::send_stream(conn, &id, &Default::default(), move |sink| {
        sink.declare(measure_dir(&dir)?)?;
        pack_dir(&dir, sink)?;
        Ok(())
    })
    .await
    .unwrap();
    digest
}

/// Opens a data stream with a header of the sender's choosing and a little
/// compressed content.
async fn send_forged(conn: &quinn::Connection, header: migrate_common::protocol::StreamHeader) {
    let mut send = conn.open_uni().await.unwrap();
    migrate_common::protocol::write_frame(&mut send, &header)
        .await
        .unwrap();
    let _ = send.write_all(&[0x28, 0xb5, 0x2f, 0xfd]).await;
    let _ = send.finish();
}

fn forged(
    kind: StreamKind,
    round: u32,
    name: &str,
    declared_bytes: u64,
) -> migrate_common::protocol::StreamHeader {
    migrate_common::protocol::StreamHeader {
        kind: kind as i32,
        name: name.into(),
        round,
        declared_bytes,
        offset: 0,
        codec: migrate_common::protocol::StreamCodec::Zstd as i32,
    }
}

/// The reason the next refused stream fails the migration with.
async fn refusal(inbox: &Inbox) -> String {
    let wait = async {
        loop {
            if let Err(e) = inbox.verify(&[]).await {
                return format!("{e:#}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), wait)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_layer_holding_a_unix_socket_is_transferred_and_verified() {
    use migrate_common::protocol::LayerInfo;
    use migrate_common::rootfs::{digest::layer_digest, tree_size};

    let layer = tempfile::tempdir().unwrap();
    std::fs::create_dir(layer.path().join("run")).unwrap();
    std::fs::write(layer.path().join("run/data"), b"kept").unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(layer.path().join("run/sock")).unwrap();
    let digest = layer_digest(layer.path()).unwrap();
    let hello = Hello {
        layers: vec![LayerInfo {
            digest: digest.to_string(),
            size_bytes: tree_size(layer.path()).unwrap(),
        }],
        ..Hello::default()
    };
    let rig = rig(hello, UnpackPolicy::strict(), &[digest.as_str()]).await;
    let id = StreamId::new(StreamKind::Layer, 0, digest.as_str());
    let sent = send_tree(&rig.src, id, layer.path()).await;
    rig.inbox.verify(&[sent]).await.unwrap();
    assert!(rig.store.has(&digest));
    let stored = rig.store.path(&digest);
    assert_eq!(std::fs::read(stored.join("run/data")).unwrap(), b"kept");
    assert!(!stored.join("run/sock").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_the_protocol_does_not_expect_now_are_refused() {
    let asked = "b3:".to_owned() + &"a".repeat(64);
    let other = "b3:".to_owned() + &"b".repeat(64);
    let hello = Hello {
        layers: vec![migrate_common::protocol::LayerInfo {
            digest: asked.clone(),
            size_bytes: 10,
        }],
        ..Hello::default()
    };
    let cases = [
        (
            forged(StreamKind::Layer, 0, &other, 10),
            "was not asked for",
        ),
        (
            forged(StreamKind::Layer, 0, &asked, 4096),
            "more than the 10 its Hello announced",
        ),
        (
            forged(StreamKind::PageTunnel, 0, "", 0),
            "PageTunnel is not a data stream",
        ),
        (
            forged(StreamKind::UpperDir, 0, "second", 0),
            "names round 0",
        ),
        (
            forged(StreamKind::Image, MAX_ROUNDS + 1, "a.img", 0),
            "beyond the limit",
        ),
    ];
    for (header, expected) in cases {
        let rig = rig(hello.clone(), UnpackPolicy::strict(), &[asked.as_str()]).await;
        send_forged(&rig.src, header).await;
        let reason = refusal(&rig.inbox).await;
        assert!(reason.contains(expected), "{expected:?} not in {reason:?}");
    }

    // One upper dir, one delta, and no image of a dump once it is verified.
    let rig = rig(hello, UnpackPolicy::strict(), &[]).await;
    let empty = tempfile::tempdir().unwrap();
    let upper = send_tree(
        &rig.src,
        StreamId::new(StreamKind::UpperDir, 0, ""),
        empty.path(),
    )
    .await;
    let image = StreamId::new(StreamKind::Image, 1, "a.img");
    let file = empty.path().join("a.img");
    std::fs::write(&file, b"pages").unwrap();
    let image = transfer::send_segment(&rig.src, &image, file, 5, &Default::default())
        .await
        .unwrap();
    rig.inbox.verify(&[upper, image]).await.unwrap();
    send_forged(&rig.src, forged(StreamKind::Image, 1, "late.img", 0)).await;
    let reason = refusal(&rig.inbox).await;
    assert!(
        reason.contains("late.img (round 1) arrived after its dump was verified"),
        "{reason}"
    );

    let rig2 = self::rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    send_tree(
        &rig2.src,
        StreamId::new(StreamKind::UpperDir, 0, ""),
        empty.path(),
    )
    .await;
    send_forged(&rig2.src, forged(StreamKind::UpperDir, 0, "", 0)).await;
    let reason = refusal(&rig2.inbox).await;
    assert!(reason.contains("UpperDir was already sent"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_decides_whether_a_setuid_file_may_come() {
    use std::os::unix::fs::PermissionsExt;

    let tree = tempfile::tempdir().unwrap();
    let file = tree.path().join("su");
    std::fs::write(&file, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let id = StreamId::new(StreamKind::UpperDir, 0, "");

    let strict = rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    let sent = send_tree(&strict.src, id.clone(), tree.path()).await;
    let err = strict.inbox.verify(&[sent]).await.unwrap_err();
    assert!(format!("{err:#}").contains("setuid"), "{err:#}");

    let privileged = rig(Hello::default(), UnpackPolicy::privileged(), &[]).await;
    let sent = send_tree(&privileged.src, id, tree.path()).await;
    privileged.inbox.verify(&[sent]).await.unwrap();
    let mode = std::fs::metadata(privileged.upper.join("su"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o4755);
}

/// Sends bytes `offset..offset + len` of `file` as image `name` of the final dump.
async fn send_piece(rig: &Rig, file: &Path, name: &str, offset: u64, len: u64) -> FileDigest {
    let id = StreamId::new(StreamKind::Image, 0, name).at(offset);
    transfer::send_segment(&rig.src, &id, file.to_owned(), len, &Default::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_sent_in_segments_out_of_order_arrives_whole() {
    let rig = rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    let source = tempfile::tempdir().unwrap();
    let file = source.path().join("pages-1.img");
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &payload).unwrap();

    let tail = send_piece(&rig, &file, "pages-1.img", 2000, 1000).await;
    let head = send_piece(&rig, &file, "pages-1.img", 0, 2000).await;
    rig.inbox.verify(&[tail, head]).await.unwrap();
    assert_eq!(
        std::fs::read(rig.images.join("final/pages-1.img")).unwrap(),
        payload
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn segments_that_overlap_leave_a_gap_or_are_not_listed_fail() {
    let source = tempfile::tempdir().unwrap();
    let file = source.path().join("pages-1.img");
    std::fs::write(&file, vec![1u8; 3000]).unwrap();

    let overlapping = rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    let head = send_piece(&overlapping, &file, "pages-1.img", 0, 2000).await;
    overlapping
        .inbox
        .wait_for(&StreamId::of(&head))
        .await
        .unwrap();
    let mut header = forged(StreamKind::Image, 0, "pages-1.img", 10);
    header.offset = 1995;
    send_forged(&overlapping.src, header).await;
    let reason = refusal(&overlapping.inbox).await;
    assert!(
        reason.contains("bytes 1995..2005 overlap bytes 0..2000"),
        "{reason}"
    );

    let gap = rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    let head = send_piece(&gap, &file, "pages-1.img", 0, 1000).await;
    let tail = send_piece(&gap, &file, "pages-1.img", 2000, 1000).await;
    let err = gap.inbox.verify(&[head, tail]).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("no segment starts at byte 1000"),
        "{err:#}"
    );

    let unlisted = rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    let head = send_piece(&unlisted, &file, "pages-1.img", 0, 1000).await;
    let extra = send_piece(&unlisted, &file, "pages-1.img", 1000, 1000).await;
    // The extra segment has arrived once a manifest naming it verifies.
    unlisted
        .inbox
        .wait_for(&StreamId::of(&extra))
        .await
        .unwrap();
    let err = unlisted.inbox.verify(&[head]).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("the manifest of its dump does not list it"),
        "{err:#}"
    );

    let past_the_end = rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    let mut header = forged(StreamKind::Image, 0, "pages-1.img", 2);
    header.offset = u64::MAX - 1;
    send_forged(&past_the_end.src, header).await;
    let reason = refusal(&past_the_end.inbox).await;
    assert!(reason.contains("ends beyond any file's size"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_images_come_in_segments() {
    let rig = rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    let mut header = forged(StreamKind::UpperDir, 0, "", 10);
    header.offset = 10;
    send_forged(&rig.src, header).await;
    let reason = refusal(&rig.inbox).await;
    assert!(reason.contains("only images come in segments"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_probe_is_read_and_dropped_once_and_bounded() {
    use migrate_common::transfer::probe::{send_probe, MAX_PROBE_BYTES};

    let once = rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    let rate = send_probe(&once.src, 4 << 20).await.unwrap();
    assert!(rate > 0.0, "{rate}");
    assert!(
        std::fs::read_dir(&once.images).unwrap().next().is_none(),
        "a probe left something in the image dir"
    );
    send_forged(&once.src, forged(StreamKind::Probe, 0, "", 10)).await;
    let reason = refusal(&once.inbox).await;
    assert!(reason.contains("Probe was already sent"), "{reason}");

    let oversized = rig(Hello::default(), UnpackPolicy::strict(), &[]).await;
    send_forged(
        &oversized.src,
        forged(StreamKind::Probe, 0, "", MAX_PROBE_BYTES + 1),
    )
    .await;
    let reason = refusal(&oversized.inbox).await;
    assert!(reason.contains("more than the"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn images_are_charged_to_the_image_space_and_the_rest_to_the_disk() {
    // Room on the disk for the upper dir, none in the image space for an
    // image as large.
    let budgets = Budgets {
        disk: Arc::new(ByteBudget::new(1 << 20)),
        images: Arc::new(ByteBudget::for_space(1 << 10, "destination image space")),
    };
    let rig = rig_within(Hello::default(), UnpackPolicy::strict(), &[], budgets).await;
    let tree = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("data"), vec![7u8; 64 << 10]).unwrap();
    let id = StreamId::new(StreamKind::UpperDir, 0, "");
    let sent = send_tree(&rig.src, id, tree.path()).await;
    rig.inbox.verify(&[sent]).await.unwrap();
    assert_eq!(
        std::fs::read(rig.upper.join("data")).unwrap().len(),
        64 << 10
    );

    send_forged(
        &rig.src,
        forged(StreamKind::Image, 0, "pages-1.img", 64 << 10),
    )
    .await;
    let refused = refusal(&rig.inbox).await;
    assert!(
        refused.contains("pages-1.img") && refused.contains("(destination image space)"),
        "{refused}"
    );
}
