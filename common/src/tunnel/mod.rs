//! Relays one local socket over a stream of the migration's QUIC connection,
//! so that CRIU's page-server traffic (post-copy pages) never leaves the
//! mutually authenticated link, and survives that link being replaced.
//!
//! On each host a CRIU process holds one end of a socketpair (the source's
//! lazy dump serves pages on it, the destination's lazy-pages daemon asks for
//! pages on it) and the agent holds the other; nothing listens anywhere, so no
//! other local process can reach the container's memory. The agents relay
//! bytes between their ends and a bidirectional QUIC stream, framed
//! ([`replay::Frame`]) so that each side acknowledges what it has taken and
//! keeps what it sent until acknowledged ([`replay::ReplayBuffer`]). When the
//! connection is lost, both CRIU processes just wait on their sockets; on a
//! new connection [`Tunnel::run`] starts again from the offset the peer
//! reports, and neither CRIU notices.
//!
//! Towards the source's CRIU the relay forwards whole page-server requests
//! only ([`Inbound::CriuRequests`]), holds the daemon's final close until its
//! owner allows it, and can end the transfer with an error ([`Tunnel::abort`])
//! at a request boundary.

pub mod replay;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::criu::page_server::{abort_request, Iov, RequestCutter};
use crate::transfer::bucket::Throttle;
use replay::{Frame, FrameError, ReplayBuffer, CHECKSUM_LEN, MAX_DATA_FRAME};

/// Bytes kept for a resend at most; reading from the local socket pauses
/// when this much is unacknowledged.
const REPLAY_LIMIT: usize = 32 << 20;
/// An acknowledgement goes out after this many bytes taken.
const ACK_EVERY: u64 = 256 << 10;
/// Largest read from the local socket, and so largest data frame sent.
const READ_CHUNK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the link to the peer failed")]
    Link(#[source] io::Error),
    #[error("the peer closed the tunnel stream")]
    PeerClosed,
    #[error("the local CRIU socket failed")]
    Local(#[source] io::Error),
    #[error(transparent)]
    Protocol(#[from] FrameError),
    #[error("the owner of the tunnel stopped answering")]
    OwnerGone,
}

/// What the bytes from the peer are, and so how they reach the local socket.
#[derive(Debug)]
pub enum Inbound {
    /// Passed on as they come.
    Raw,
    /// A lazy-pages daemon's requests to the source's CRIU: passed on whole,
    /// and the final close only once the owner answers the request sent on
    /// `close_gate` (it must thaw the original first, see the source agent).
    CriuRequests {
        close_gate: mpsc::Sender<oneshot::Sender<()>>,
    },
}

/// Test builds only (feature `fault-injection`): `MIGRATE_FAULT_FLIP=
/// page-tunnel@OFFSET` inverts the byte at OFFSET of this side's stream in
/// the first data frame that carries it, after its checksum, once: what the
/// replay resends later is clean.
#[cfg(feature = "fault-injection")]
mod fault {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    use crate::transfer::fault::{Flip, FLIP_ENV};

    static FLIP: OnceLock<Option<Flip>> = OnceLock::new();
    static DONE: AtomicBool = AtomicBool::new(false);

    /// `frame` is an encoded data frame of `len` bytes of the stream from `at`.
    pub fn corrupt_once(at: u64, len: usize, frame: &mut [u8]) {
        let flip = FLIP.get_or_init(|| {
            std::env::var(FLIP_ENV)
                .ok()
                .and_then(|spec| Flip::parse(&spec))
                .filter(|flip| flip.stream == "page-tunnel")
        });
        let Some(flip) = flip else { return };
        let Some(index) = flip
            .offset
            .checked_sub(at)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        if index < len && !DONE.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                offset = flip.offset,
                "fault injection: corrupting a page tunnel frame"
            );
            let data_start = frame.len() - len;
            frame[data_start + index] ^= 0xff;
        }
    }
}

/// One relayed socket, for the life of a migration (across connections).
#[derive(Debug, Clone)]
pub struct Tunnel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    reader: tokio::sync::Mutex<Option<OwnedReadHalf>>,
    writer: tokio::sync::Mutex<Writer>,
    replay: Mutex<ReplayBuffer>,
    /// Signalled when acknowledgements make room in `replay`.
    room: Notify,
    /// Bytes of the peer's stream taken so far.
    delivered: AtomicU64,
    /// What was last acknowledged to the peer.
    acked_to_peer: AtomicU64,
    /// Signalled when an acknowledgement is due.
    ack_due: Notify,
    close_seen: AtomicBool,
    /// `--max-bandwidth`, on what this side sends the peer.
    throttle: Option<Arc<Throttle>>,
}

#[derive(Debug)]
struct Writer {
    half: NoShutdown,
    inbound: Inbound,
    cutter: RequestCutter,
    aborted: bool,
}

/// The local socket's write half, which is never shut down: tokio's
/// would be when dropped, and CRIU's page server takes the end of its
/// socket for a transfer that ended well (and kills the original). The
/// socket closes only with its last descriptor, and runc and CRIU hold
/// one, so an agent that dies or gives up leaves CRIU waiting.
#[derive(Debug)]
struct NoShutdown(Option<OwnedWriteHalf>);

impl NoShutdown {
    fn get(&mut self) -> &mut OwnedWriteHalf {
        self.0
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only when dropped"))
    }
}

impl Drop for NoShutdown {
    fn drop(&mut self) {
        if let Some(half) = self.0.take() {
            half.forget();
        }
    }
}

impl Tunnel {
    pub fn new(local: UnixStream, inbound: Inbound) -> Self {
        Self::capped(local, inbound, None)
    }

    /// A tunnel whose frames to the peer pass `throttle` first (the source's,
    /// whose frames are pages: `--max-bandwidth` covers them too).
    pub fn capped(local: UnixStream, inbound: Inbound, throttle: Option<Arc<Throttle>>) -> Self {
        let (read, write) = local.into_split();
        Self {
            inner: Arc::new(Inner {
                reader: tokio::sync::Mutex::new(Some(read)),
                writer: tokio::sync::Mutex::new(Writer {
                    half: NoShutdown(Some(write)),
                    inbound,
                    cutter: RequestCutter::default(),
                    aborted: false,
                }),
                replay: Mutex::new(ReplayBuffer::new(REPLAY_LIMIT)),
                room: Notify::new(),
                delivered: AtomicU64::new(0),
                acked_to_peer: AtomicU64::new(0),
                ack_due: Notify::new(),
                close_seen: AtomicBool::new(false),
                throttle,
            }),
        }
    }

    /// Bytes of the peer's stream taken so far: what a new connection must
    /// resume from.
    pub fn delivered(&self) -> u64 {
        self.inner.delivered.load(Ordering::SeqCst)
    }

    /// Bytes of our own stream sent so far (some perhaps not yet taken).
    pub fn sent(&self) -> u64 {
        self.replay().sent()
    }

    /// Whether the lazy-pages daemon's final close has passed through.
    pub fn close_seen(&self) -> bool {
        self.inner.close_seen.load(Ordering::SeqCst)
    }

    /// Relays over one connection's stream until it fails; the caller then
    /// calls again on the next connection. `peer_delivered` is how much of
    /// our stream the peer had taken when this connection began.
    pub async fn run<W, R>(
        &self,
        mut send: W,
        mut recv: R,
        peer_delivered: u64,
    ) -> Result<(), TunnelError>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        let again = self.replay().resend_from(peer_delivered)?;
        for chunk in again {
            self.admit(chunk.len()).await;
            write_frame(&mut send, &Frame::Data(chunk)).await?;
        }
        // What the previous connection acknowledged may not have arrived.
        let delivered = self.delivered();
        write_frame(&mut send, &Frame::Ack(delivered)).await?;
        self.inner.acked_to_peer.store(delivered, Ordering::SeqCst);
        tokio::try_join!(self.upstream(&mut send), self.downstream(&mut recv))?;
        Ok(())
    }

    /// Ends the page transfer with an error CRIU understands, between two
    /// requests, and stops passing on the peer's requests.
    pub async fn abort(&self) -> Result<(), TunnelError> {
        let mut writer = self.inner.writer.lock().await;
        writer.aborted = true;
        writer
            .half
            .get()
            .write_all(&abort_request())
            .await
            .map_err(TunnelError::Local)
    }

    /// Waits until `bytes` may go to the peer, if there is a cap.
    async fn admit(&self, bytes: usize) {
        if let Some(throttle) = &self.inner.throttle {
            throttle.admit(bytes as u64).await;
        }
    }

    fn replay(&self) -> std::sync::MutexGuard<'_, ReplayBuffer> {
        // The buffer holds no invariant a panicking holder could break
        // half-way: every update is a single call.
        self.inner
            .replay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Local socket → peer, and acknowledgements of what we took.
    async fn upstream<W: AsyncWrite + Unpin>(&self, send: &mut W) -> Result<(), TunnelError> {
        let mut reader = self.inner.reader.lock().await;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let room = self.replay().room().min(READ_CHUNK);
            let ack_due = self.inner.ack_due.notified();
            let room_made = self.inner.room.notified();
            tokio::select! {
                biased;
                () = ack_due => {
                    let delivered = self.delivered();
                    if delivered > self.inner.acked_to_peer.swap(delivered, Ordering::SeqCst) {
                        write_frame(send, &Frame::Ack(delivered)).await?;
                    }
                }
                () = room_made, if room == 0 => {}
                read = read_some(reader.as_mut(), &mut buf[..room.max(1)]), if room > 0 && reader.is_some() => {
                    let n = read.map_err(TunnelError::Local)?;
                    if n == 0 {
                        // The local CRIU is done; the peer's side still runs.
                        *reader = None;
                        continue;
                    }
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    #[cfg(feature = "fault-injection")]
                    let at = self.replay().sent();
                    self.replay().push(chunk.clone());
                    #[allow(unused_mut)]
                    let mut frame = Frame::Data(chunk).encode();
                    #[cfg(feature = "fault-injection")]
                    fault::corrupt_once(at, n, &mut frame);
                    self.admit(frame.len()).await;
                    send.write_all(&frame).await.map_err(TunnelError::Link)?;
                }
            }
        }
    }

    /// Peer → local socket, and the peer's acknowledgements.
    async fn downstream<R: AsyncRead + Unpin>(&self, recv: &mut R) -> Result<(), TunnelError> {
        loop {
            match read_frame(recv).await? {
                Frame::Ack(acked) => {
                    self.replay().ack(acked)?;
                    self.inner.room.notify_one();
                }
                Frame::Data(data) => {
                    self.deliver(&data).await?;
                    let delivered = self
                        .inner
                        .delivered
                        .fetch_add(data.len() as u64, Ordering::SeqCst)
                        + data.len() as u64;
                    if delivered - self.inner.acked_to_peer.load(Ordering::SeqCst) >= ACK_EVERY {
                        self.inner.ack_due.notify_one();
                    }
                }
            }
        }
    }

    async fn deliver(&self, data: &[u8]) -> Result<(), TunnelError> {
        let mut writer = self.inner.writer.lock().await;
        let Writer {
            half,
            inbound,
            cutter,
            aborted,
        } = &mut *writer;
        let half = half.get();
        match inbound {
            Inbound::Raw => half.write_all(data).await.map_err(TunnelError::Local),
            Inbound::CriuRequests { close_gate } => {
                for request in cutter.push(data) {
                    if *aborted {
                        continue;
                    }
                    if Iov::decode(&request).is_close() {
                        let (allow, allowed) = oneshot::channel();
                        close_gate
                            .send(allow)
                            .await
                            .map_err(|_| TunnelError::OwnerGone)?;
                        allowed.await.map_err(|_| TunnelError::OwnerGone)?;
                        self.inner.close_seen.store(true, Ordering::SeqCst);
                    }
                    half.write_all(&request).await.map_err(TunnelError::Local)?;
                }
                Ok(())
            }
        }
    }
}

/// A read that never completes once the local socket has ended.
async fn read_some(reader: Option<&mut OwnedReadHalf>, buf: &mut [u8]) -> io::Result<usize> {
    match reader {
        Some(reader) => reader.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(
    send: &mut W,
    frame: &Frame,
) -> Result<(), TunnelError> {
    send.write_all(&frame.encode())
        .await
        .map_err(TunnelError::Link)
}

async fn read_frame<R: AsyncRead + Unpin>(recv: &mut R) -> Result<Frame, TunnelError> {
    let link = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            TunnelError::PeerClosed
        } else {
            TunnelError::Link(e)
        }
    };
    let kind = recv.read_u8().await.map_err(link)?;
    let header_len = Frame::header_len(kind)?;
    let mut header = [0u8; 8];
    recv.read_exact(&mut header[..header_len])
        .await
        .map_err(link)?;
    if !Frame::is_data(kind) {
        return Ok(Frame::Ack(u64::from_be_bytes(header)));
    }
    let len = Frame::data_len([header[0], header[1], header[2], header[3]])?;
    debug_assert!(len <= MAX_DATA_FRAME);
    let mut sum = [0u8; CHECKSUM_LEN];
    recv.read_exact(&mut sum).await.map_err(link)?;
    let mut data = vec![0u8; len];
    recv.read_exact(&mut data).await.map_err(link)?;
    Ok(Frame::data(sum, data)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
