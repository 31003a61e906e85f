//! Bulk data on QUIC data streams: one file (or one archive) per
//! unidirectional stream, framed as a [`StreamHeader`] then zstd-compressed
//! bytes until the stream ends.
//!
//! Compression, hashing and file I/O are blocking work, so each stream runs
//! them on a blocking thread joined to the async QUIC side by a bounded
//! channel of large chunks; the channel's bound is what applies back-pressure
//! from a slow link to the disk reader. Checksums are blake3 over the
//! uncompressed bytes: the sender reports them in the manifest
//! ([`FileDigest`]) and the receiver compares what it computed itself.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::protocol::{read_frame, write_frame, FileDigest, FrameError, StreamHeader, StreamKind};
use crate::rootfs::archive::ArchiveError;

/// Size of the chunks passed between the blocking and the async side.
const CHUNK: usize = 1 << 20;
/// Chunks in flight per stream between the two sides.
const CHANNEL_DEPTH: usize = 8;
/// zstd level 1: on a fast link the compressor, not the network, is the
/// bottleneck, and level 1 already removes most of the zero pages in images.
const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("opening a data stream")]
    Open(#[source] quinn::ConnectionError),
    #[error("writing to data stream for {name}")]
    Write {
        name: String,
        #[source]
        source: quinn::WriteError,
    },
    #[error("reading data stream for {name}")]
    Read {
        name: String,
        #[source]
        source: quinn::ReadError,
    },
    #[error("data stream header")]
    Header(#[from] FrameError),
    #[error("data stream ended before its header")]
    NoHeader,
    #[error("data stream of unknown kind {0}")]
    UnknownKind(i32),
    #[error("the migration's byte budget of {limit} bytes is exhausted (destination disk space)")]
    BudgetExceeded { limit: u64 },
    #[error("archive")]
    Archive(#[from] ArchiveError),
    #[error("blocking worker for {name} panicked")]
    Worker { name: String },
}

impl TransferError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// What a data stream carries, as its header names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    pub kind: StreamKind,
    /// For images: the pre-dump round, 0 for the final dump; else 0.
    pub round: u32,
    /// Layer digest or image file name; empty for the upper dir.
    pub name: String,
}

impl StreamId {
    pub fn new(kind: StreamKind, round: u32, name: impl Into<String>) -> Self {
        Self {
            kind,
            round,
            name: name.into(),
        }
    }

    /// The stream a manifest entry names (an unknown kind becomes
    /// [`StreamKind::Invalid`], which no stream has).
    pub fn of(digest: &FileDigest) -> Self {
        Self {
            kind: StreamKind::try_from(digest.kind).unwrap_or(StreamKind::Invalid),
            round: digest.round,
            name: digest.name.clone(),
        }
    }

    pub fn digest(&self, raw_bytes: u64, blake3: String) -> FileDigest {
        FileDigest {
            kind: self.kind as i32,
            name: self.name.clone(),
            raw_bytes,
            blake3,
            round: self.round,
        }
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.kind, self.round) {
            (StreamKind::Image, 0) => write!(f, "image {} (final dump)", self.name),
            (StreamKind::Image, round) => write!(f, "image {} (round {round})", self.name),
            (StreamKind::Layer, _) => write!(f, "layer {}", self.name),
            (kind, _) => write!(f, "{kind:?}"),
        }
    }
}

/// Byte counters shared by every stream of one migration (progress display
/// and the final summary read them): uncompressed bytes, and what zstd made
/// of them.
#[derive(Debug, Default)]
pub struct TransferStats {
    raw_bytes: AtomicU64,
    compressed_bytes: AtomicU64,
}

impl TransferStats {
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes.load(Ordering::Relaxed)
    }
    pub fn compressed_bytes(&self) -> u64 {
        self.compressed_bytes.load(Ordering::Relaxed)
    }
}

/// A bound on the uncompressed bytes a receiver accepts over a whole
/// migration, so a confused or hostile sender cannot fill the disk.
#[derive(Debug)]
pub struct ByteBudget {
    limit: u64,
    used: AtomicU64,
}

impl ByteBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            used: AtomicU64::new(0),
        }
    }

    fn charge(&self, n: u64) -> io::Result<()> {
        let used = self.used.fetch_add(n, Ordering::Relaxed) + n;
        if used > self.limit {
            return Err(io::Error::other(TransferError::BudgetExceeded {
                limit: self.limit,
            }));
        }
        Ok(())
    }
}

/// Counts and hashes everything written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
    stats: Arc<TransferStats>,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.stats.raw_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts, hashes and charges to a budget everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    bytes: u64,
    budget: Arc<ByteBudget>,
    stats: Arc<TransferStats>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.charge(n as u64)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.stats.raw_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The blocking side's writer: hands full chunks to the async side.
struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "data stream closed"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

/// The blocking side's reader: takes chunks from the async side.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Opens a data stream, writes `header`, then the compressed output of
/// `produce` (which runs on a blocking thread). Returns what `produce`
/// returned and the manifest entry.
pub async fn send_stream<F, T>(
    conn: &quinn::Connection,
    id: &StreamId,
    stats: Arc<TransferStats>,
    produce: F,
) -> Result<(T, FileDigest), TransferError>
where
    F: FnOnce(&mut dyn Write) -> Result<T, TransferError> + Send + 'static,
    T: Send + 'static,
{
    let name = id.to_string();
    let mut send = conn.open_uni().await.map_err(TransferError::Open)?;
    let header = StreamHeader {
        kind: id.kind as i32,
        name: id.name.clone(),
        round: id.round,
    };
    write_frame(&mut send, &header).await?;

    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let worker_stats = stats.clone();
    let worker = tokio::task::spawn_blocking(move || -> Result<(T, u64, String), TransferError> {
        let channel = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        let encoder = zstd::stream::write::Encoder::new(channel, ZSTD_LEVEL)
            .map_err(|e| TransferError::io("starting zstd", e))?;
        let mut hashing = HashingWriter {
            inner: encoder,
            hasher: blake3::Hasher::new(),
            bytes: 0,
            stats: worker_stats,
        };
        let value = produce(&mut hashing)?;
        let HashingWriter {
            inner: encoder,
            hasher,
            bytes,
            ..
        } = hashing;
        let mut channel = encoder
            .finish()
            .map_err(|e| TransferError::io("finishing zstd", e))?;
        channel
            .flush()
            .map_err(|e| TransferError::io("flushing stream", e))?;
        Ok((value, bytes, hasher.finalize().to_hex().to_string()))
    });

    let mut write_result = Ok(());
    while let Some(chunk) = rx.recv().await {
        let len = chunk.len() as u64;
        if let Err(source) = send.write_chunk(chunk).await {
            write_result = Err(TransferError::Write {
                name: name.to_owned(),
                source,
            });
            break;
        }
        stats.compressed_bytes.fetch_add(len, Ordering::Relaxed);
    }
    // Dropping the receiver unblocks a producer stuck on a full channel.
    drop(rx);
    let produced = worker.await.map_err(|_| TransferError::Worker {
        name: name.to_owned(),
    })?;
    write_result?;
    let (value, raw_bytes, blake3) = produced?;
    send.finish().map_err(|_| TransferError::Write {
        name: name.to_owned(),
        source: quinn::WriteError::ClosedStream,
    })?;
    Ok((value, id.digest(raw_bytes, blake3)))
}

/// Sends one regular file.
pub async fn send_file(
    conn: &quinn::Connection,
    id: &StreamId,
    path: PathBuf,
    stats: Arc<TransferStats>,
) -> Result<FileDigest, TransferError> {
    let ((), digest) = send_stream(conn, id, stats, move |sink| {
        let mut file = File::open(&path)
            .map_err(|e| TransferError::io(format!("opening {}", path.display()), e))?;
        copy_large(&mut file, sink)
            .map_err(|e| TransferError::io(format!("sending {}", path.display()), e))?;
        Ok(())
    })
    .await?;
    Ok(digest)
}

/// Reads the header of an accepted data stream.
pub async fn read_header<R: tokio::io::AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<StreamId, TransferError> {
    let header: StreamHeader = read_frame(recv).await?.ok_or(TransferError::NoHeader)?;
    let kind = StreamKind::try_from(header.kind)
        .ok()
        .filter(|k| *k != StreamKind::Invalid)
        .ok_or(TransferError::UnknownKind(header.kind))?;
    Ok(StreamId::new(kind, header.round, header.name))
}

/// Receives the body of a data stream (after [`read_header`]) and hands it,
/// decompressed, to `consume` on a blocking thread. Whatever `consume` leaves
/// unread is read and hashed too, so the digest always covers the whole
/// stream. Returns the consumer's result and the stream's digest.
pub async fn receive_stream<F, T>(
    mut recv: quinn::RecvStream,
    id: &StreamId,
    budget: Arc<ByteBudget>,
    stats: Arc<TransferStats>,
    consume: F,
) -> Result<(T, FileDigest), TransferError>
where
    F: FnOnce(&mut dyn Read) -> Result<T, TransferError> + Send + 'static,
    T: Send + 'static,
{
    let name = id.to_string();
    let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let wire_stats = stats.clone();
    let worker = tokio::task::spawn_blocking(move || -> Result<(T, u64, String), TransferError> {
        let channel = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        let decoder = zstd::stream::read::Decoder::new(channel)
            .map_err(|e| TransferError::io("starting zstd", e))?;
        let mut source = HashingReader {
            inner: decoder,
            hasher: blake3::Hasher::new(),
            bytes: 0,
            budget,
            stats,
        };
        let value = consume(&mut source)?;
        io::copy(&mut source, &mut io::sink())
            .map_err(|e| TransferError::io("draining data stream", e))?;
        Ok((
            value,
            source.bytes,
            source.hasher.finalize().to_hex().to_string(),
        ))
    });

    let mut read_result = Ok(());
    let mut consumer_stopped = false;
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                wire_stats
                    .compressed_bytes
                    .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                if tx.send(chunk.bytes).await.is_err() {
                    consumer_stopped = true;
                    break;
                }
            }
            Ok(None) => break,
            Err(source) => {
                read_result = Err(TransferError::Read {
                    name: name.to_owned(),
                    source,
                });
                break;
            }
        }
    }
    drop(tx);
    let consumed = worker.await.map_err(|_| TransferError::Worker {
        name: name.to_owned(),
    })?;
    if consumer_stopped {
        // The consumer gave up first (bad data, budget, disk): its error is
        // the cause; nothing more will be read from this stream.
        let _ = recv.stop(0u32.into());
    } else {
        read_result?;
    }
    let (value, raw_bytes, blake3) = consumed?;
    Ok((value, id.digest(raw_bytes, blake3)))
}

/// Receives a data stream into a new file at `path`.
pub async fn receive_file(
    recv: quinn::RecvStream,
    id: &StreamId,
    path: &Path,
    budget: Arc<ByteBudget>,
    stats: Arc<TransferStats>,
) -> Result<FileDigest, TransferError> {
    let path = path.to_owned();
    let (_, digest) = receive_stream(recv, id, budget, stats, move |source| {
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| TransferError::io(format!("creating {}", path.display()), e))?;
        copy_large(source, &mut file)
            .map_err(|e| TransferError::io(format!("writing {}", path.display()), e))?;
        file.sync_data()
            .map_err(|e| TransferError::io(format!("syncing {}", path.display()), e))?;
        Ok(())
    })
    .await?;
    Ok(digest)
}

/// `io::copy` with a buffer sized for bulk transfer instead of 8 KiB.
fn copy_large<R: Read + ?Sized, W: Write + ?Sized>(input: &mut R, out: &mut W) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
        let generated = patterned(CHUNK / 3);

        let send_stats = Arc::new(TransferStats::default());
        let sender = {
            let (src, stats, generated) = (src.clone(), send_stats.clone(), generated.clone());
            tokio::spawn(async move {
                let a = send_file(
                    &src,
                    &StreamId::new(StreamKind::Image, 2, "pages-1.img"),
                    file,
                    stats.clone(),
                )
                .await
                .unwrap();
                let upper = StreamId::new(StreamKind::UpperDir, 0, "");
                let ((), b) = send_stream(&src, &upper, stats, move |sink| {
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
        let id = read_header(&mut recv).await.unwrap();
        assert_eq!(id, StreamId::new(StreamKind::Image, 2, "pages-1.img"));
        let got_file = receive_file(recv, &id, &out, budget.clone(), recv_stats.clone())
            .await
            .unwrap();
        let mut recv = dst.accept_uni().await.unwrap();
        let id = read_header(&mut recv).await.unwrap();
        assert_eq!(id.kind, StreamKind::UpperDir);
        let (bytes, got_stream) = receive_stream(recv, &id, budget, recv_stats.clone(), |source| {
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

    #[tokio::test(flavor = "multi_thread")]
    async fn receiver_enforces_its_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (_endpoints, src, dst) = link(dir.path()).await;
        let keep_open = src.clone();
        let sender = tokio::spawn(async move {
            // The sender may see the stream reset once the receiver gives up.
            let big = StreamId::new(StreamKind::Image, 0, "big.img");
            let _ = send_stream(&src, &big, Arc::default(), |sink| {
                sink.write_all(&vec![0u8; 4 * CHUNK])
                    .map_err(|e| TransferError::io("test", e))
            })
            .await;
        });
        let mut recv = dst.accept_uni().await.unwrap();
        let id = read_header(&mut recv).await.unwrap();
        let budget = Arc::new(ByteBudget::new(CHUNK as u64));
        let err = receive_file(
            recv,
            &id,
            &dir.path().join("big.img"),
            budget,
            Arc::default(),
        )
        .await
        .unwrap_err();
        assert!(format!("{err:?}").contains("BudgetExceeded"), "{err:?}");
        sender.abort();
        drop(keep_open);
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
}
