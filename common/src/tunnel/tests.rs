use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::net::UnixStream;

use super::*;
use crate::criu::page_server::{IOV_LEN, PS_IOV_FORCE_CLOSE, PS_IOV_GET};

type Half = (WriteHalf<DuplexStream>, ReadHalf<DuplexStream>);

/// One connection's worth of link: a stream each way between two tunnels.
fn link() -> (Half, Half) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    ((a_write, a_read), (b_write, b_read))
}

fn tunnel(inbound: Inbound) -> (Tunnel, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    (Tunnel::new(ours, inbound), theirs)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn read_exactly(sock: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(10), sock.read_exact(&mut out))
        .await
        .expect("timed out reading through the tunnel")
        .unwrap();
    out
}

#[tokio::test]
async fn relays_both_ways() {
    let (src, mut criu) = tunnel(Inbound::Raw);
    let (dst, mut lazy) = tunnel(Inbound::Raw);
    let ((s_send, s_recv), (d_send, d_recv)) = link();
    let runs = tokio::spawn({
        let (src, dst) = (src.clone(), dst.clone());
        async move {
            tokio::select! {
                r = src.run(s_send, s_recv, 0) => r,
                r = dst.run(d_send, d_recv, 0) => r,
            }
        }
    });
    let pages = pattern(3 << 20, 7);
    let writer = tokio::spawn(async move {
        criu.write_all(&pages).await.unwrap();
        criu
    });
    assert_eq!(read_exactly(&mut lazy, 3 << 20).await, pattern(3 << 20, 7));
    lazy.write_all(b"request").await.unwrap();
    let mut criu = writer.await.unwrap();
    assert_eq!(read_exactly(&mut criu, 7).await, b"request");
    assert_eq!(dst.delivered(), 3 << 20);
    assert!(!runs.is_finished());
    runs.abort();
}

#[tokio::test]
async fn a_capped_tunnel_sends_no_faster_than_its_cap() {
    let (ours, mut criu) = UnixStream::pair().unwrap();
    let rate = 8 << 20;
    let src = Tunnel::capped(ours, Inbound::Raw, Some(Arc::new(Throttle::new(rate))));
    let (dst, mut lazy) = tunnel(Inbound::Raw);
    let ((s_send, s_recv), (d_send, d_recv)) = link();
    let runs = tokio::spawn({
        let (src, dst) = (src.clone(), dst.clone());
        async move {
            tokio::select! {
                r = src.run(s_send, s_recv, 0) => r,
                r = dst.run(d_send, d_recv, 0) => r,
            }
        }
    });
    let started = std::time::Instant::now();
    let pages = pattern(4 << 20, 5);
    let writer = tokio::spawn(async move {
        criu.write_all(&pages).await.unwrap();
        criu
    });
    assert_eq!(read_exactly(&mut lazy, 4 << 20).await, pattern(4 << 20, 5));
    // Four MiB at 8 MiB/s, less the throttle's burst of a tenth of a second.
    let floor = (4.0 - 0.8) / 8.0;
    assert!(
        started.elapsed().as_secs_f64() >= floor,
        "{:?}",
        started.elapsed()
    );
    let _criu = writer.await.unwrap();
    runs.abort();
}

#[tokio::test]
async fn resumes_on_a_new_link_without_loss_or_duplicates() {
    let (src, mut criu) = tunnel(Inbound::Raw);
    let (dst, mut lazy) = tunnel(Inbound::Raw);
    let total = 8 << 20;
    let pages = pattern(total, 3);
    let writer = tokio::spawn(async move {
        criu.write_all(&pages).await.unwrap();
        criu
    });

    // First link: cut after part of the stream has crossed, with more still
    // in the pipe (lost with it).
    let ((s_send, s_recv), (d_send, d_recv)) = link();
    let first = read_exactly(&mut lazy, 1 << 20);
    let cut = async {
        tokio::select! {
            r = src.run(s_send, s_recv, 0) => panic!("source ended first: {r:?}"),
            r = dst.run(d_send, d_recv, 0) => panic!("destination ended first: {r:?}"),
            got = first => got,
        }
    };
    let mut received = cut.await;
    assert!(
        src.sent() > dst.delivered(),
        "bytes were in flight at the cut"
    );

    // Second link: each side resumes from what the other has taken.
    let ((s_send, s_recv), (d_send, d_recv)) = link();
    let (src_from, dst_from) = (dst.delivered(), src.delivered());
    let rest = read_exactly(&mut lazy, total - (1 << 20));
    let resumed = async {
        tokio::select! {
            r = src.run(s_send, s_recv, src_from) => panic!("source ended: {r:?}"),
            r = dst.run(d_send, d_recv, dst_from) => panic!("destination ended: {r:?}"),
            got = rest => got,
        }
    };
    received.extend(resumed.await);
    assert_eq!(received, pattern(total, 3));
    writer.await.unwrap();
}

#[tokio::test]
async fn resuming_before_what_was_kept_is_refused() {
    let (src, _criu) = tunnel(Inbound::Raw);
    src.replay().push(Bytes::from_static(b"abcd"));
    src.replay().ack(4).unwrap();
    let ((s_send, s_recv), _peer) = link();
    let err = src.run(s_send, s_recv, 1).await.unwrap_err();
    assert!(matches!(
        err,
        TunnelError::Protocol(FrameError::ResumeBeforeKept { from: 1, kept: 4 })
    ));
}

fn request(cmd: u32) -> [u8; IOV_LEN] {
    Iov {
        cmd,
        nr_pages: 1,
        vaddr: 0x1000,
        dst_id: 1,
    }
    .encode()
}

#[tokio::test]
async fn criu_gets_whole_requests_and_the_close_only_when_allowed() {
    let (gate_tx, mut gate) = mpsc::channel(1);
    let (src, mut criu) = tunnel(Inbound::CriuRequests {
        close_gate: gate_tx,
    });
    let (dst, mut lazy) = tunnel(Inbound::Raw);
    let ((s_send, s_recv), (d_send, d_recv)) = link();
    let runs = tokio::spawn({
        let (src, dst) = (src.clone(), dst.clone());
        async move {
            tokio::select! {
                r = src.run(s_send, s_recv, 0) => r,
                r = dst.run(d_send, d_recv, 0) => r,
            }
        }
    });
    let get = request(PS_IOV_GET);
    lazy.write_all(&get[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    lazy.write_all(&get[10..]).await.unwrap();
    assert_eq!(read_exactly(&mut criu, IOV_LEN).await, get);

    lazy.write_all(&request(PS_IOV_FORCE_CLOSE)).await.unwrap();
    let allow = tokio::time::timeout(Duration::from_secs(5), gate.recv())
        .await
        .unwrap()
        .unwrap();
    let mut probe = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), criu.read(&mut probe))
            .await
            .is_err(),
        "the close reached CRIU before it was allowed"
    );
    assert!(!src.close_seen());
    allow.send(()).unwrap();
    assert_eq!(
        read_exactly(&mut criu, IOV_LEN).await,
        request(PS_IOV_FORCE_CLOSE)
    );
    assert!(src.close_seen());
    runs.abort();
}

#[tokio::test]
async fn abort_sends_criu_an_unknown_command_and_drops_later_requests() {
    let (gate_tx, _gate) = mpsc::channel(1);
    let (src, mut criu) = tunnel(Inbound::CriuRequests {
        close_gate: gate_tx,
    });
    let (dst, mut lazy) = tunnel(Inbound::Raw);
    let ((s_send, s_recv), (d_send, d_recv)) = link();
    let runs = tokio::spawn({
        let (src, dst) = (src.clone(), dst.clone());
        async move {
            tokio::select! {
                r = src.run(s_send, s_recv, 0) => r,
                r = dst.run(d_send, d_recv, 0) => r,
            }
        }
    });
    // Half a request is in flight when the abort comes: it is never
    // completed towards CRIU.
    lazy.write_all(&request(PS_IOV_GET)[..16]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    src.abort().await.unwrap();
    lazy.write_all(&request(PS_IOV_GET)[16..]).await.unwrap();
    lazy.write_all(&request(PS_IOV_GET)).await.unwrap();
    let got = read_exactly(&mut criu, IOV_LEN).await;
    assert_eq!(got, abort_request());
    let mut more = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), criu.read(&mut more))
            .await
            .is_err(),
        "requests after the abort reached CRIU"
    );
    runs.abort();
}

#[tokio::test]
async fn hostile_frames_are_refused() {
    let (src, _criu) = tunnel(Inbound::Raw);
    let ((s_send, s_recv), (mut peer_send, _peer_recv)) = link();
    let mut huge = vec![1u8];
    huge.extend_from_slice(&((MAX_DATA_FRAME + 1) as u32).to_be_bytes());
    peer_send.write_all(&huge).await.unwrap();
    let err = src.run(s_send, s_recv, 0).await.unwrap_err();
    assert!(matches!(
        err,
        TunnelError::Protocol(FrameError::TooLarge { .. })
    ));

    let (src, _criu) = tunnel(Inbound::Raw);
    let ((s_send, s_recv), (mut peer_send, _peer_recv)) = link();
    peer_send.write_all(&Frame::Ack(5).encode()).await.unwrap();
    let err = src.run(s_send, s_recv, 0).await.unwrap_err();
    assert!(matches!(
        err,
        TunnelError::Protocol(FrameError::AckBeyondSent { acked: 5, sent: 0 })
    ));

    // A byte of a page changed after the peer framed it (QUIC would carry
    // it faithfully): refused, nothing of it reaches CRIU.
    let (src, mut criu) = tunnel(Inbound::Raw);
    let ((s_send, s_recv), (mut peer_send, _peer_recv)) = link();
    let mut frame = Frame::Data(Bytes::from_static(b"a page")).encode();
    *frame.last_mut().unwrap() ^= 1;
    peer_send.write_all(&frame).await.unwrap();
    let err = src.run(s_send, s_recv, 0).await.unwrap_err();
    assert!(matches!(
        err,
        TunnelError::Protocol(FrameError::Corrupt { len: 6 })
    ));
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_millis(200), criu.read(&mut byte)).await;
    assert!(read.is_err(), "CRIU got bytes of a corrupt frame: {read:?}");
}

#[tokio::test]
async fn a_dropped_tunnel_does_not_end_the_socket_while_another_holds_it() {
    let (ours, mut criu) = UnixStream::pair().unwrap();
    // What runc and CRIU inherit: another descriptor of the agent's end.
    let inherited = std::os::fd::OwnedFd::from(ours.into_std().unwrap());
    let kept = inherited.try_clone().unwrap();
    let tunnel = Tunnel::new(
        UnixStream::from_std(std::os::unix::net::UnixStream::from(inherited)).unwrap(),
        Inbound::Raw,
    );
    drop(tunnel);
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_millis(300), criu.read(&mut byte)).await;
    assert!(read.is_err(), "CRIU saw the end of its socket: {read:?}");
    // The last descriptor closing is the end.
    drop(kept);
    let read = tokio::time::timeout(Duration::from_secs(5), criu.read(&mut byte))
        .await
        .expect("the socket outlived its last descriptor");
    assert_eq!(read.unwrap(), 0);
}
