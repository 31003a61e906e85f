//! The blocking side of a stream: what the producer writes to and the consumer
//! reads from, hashing and counting on the way, joined to the async side by a
//! channel of chunks.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{TransferError, TransferStats, CHUNK};

/// Counts and hashes everything written through it.
pub(super) struct HashingWriter<W> {
    pub(super) inner: W,
    pub(super) hasher: blake3::Hasher,
    pub(super) bytes: u64,
    pub(super) stats: Arc<TransferStats>,
    /// A byte to corrupt after hashing it (test builds).
    #[cfg(feature = "fault-injection")]
    pub(super) flip: Option<super::fault::Flip>,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        #[cfg(feature = "fault-injection")]
        let n = match self.flip.as_ref().and_then(|f| f.apply(self.bytes, buf)) {
            Some(flipped) => self.inner.write(&flipped)?,
            None => self.inner.write(buf)?,
        };
        #[cfg(not(feature = "fault-injection"))]
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

/// Counts and hashes everything read through it, and stops at the first byte
/// beyond the stream's declared size.
pub(super) struct HashingReader<R> {
    pub(super) inner: R,
    pub(super) hasher: blake3::Hasher,
    pub(super) bytes: u64,
    pub(super) declared: u64,
    /// Set once the stream went beyond `declared`: whatever error the consumer
    /// makes of that, this is the cause.
    pub(super) overran: bool,
    pub(super) stats: Arc<TransferStats>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.declared - self.bytes {
            self.overran = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the stream goes beyond its declared size",
            ));
        }
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.stats.raw_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// What a producer writes a stream's content to ([`send_stream`]). It first
/// declares the most it will write ([`StreamSink::declare`]), which the
/// stream's header carries; writing more, or before declaring, fails.
pub struct StreamSink<'a> {
    pub(super) inner: &'a mut dyn Write,
    pub(super) stream: &'a str,
    pub(super) declare: Option<oneshot::Sender<u64>>,
    pub(super) declared: Option<u64>,
    pub(super) written: u64,
}

impl std::fmt::Debug for StreamSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSink")
            .field("stream", &self.stream)
            .field("declared", &self.declared)
            .field("written", &self.written)
            .finish()
    }
}

impl StreamSink<'_> {
    /// Declares that the stream will carry at most `bytes`; once, before any
    /// content.
    pub fn declare(&mut self, bytes: u64) -> Result<(), TransferError> {
        let declare = self
            .declare
            .take()
            .ok_or_else(|| TransferError::Declaration {
                stream: self.stream.to_owned(),
                problem: "its size was declared twice",
            })?;
        self.declared = Some(bytes);
        // Only a stream that already failed has no one waiting; the writes
        // that follow report that.
        let _ = declare.send(bytes);
        Ok(())
    }
}

impl Write for StreamSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let declared = self.declared.ok_or_else(|| {
            io::Error::other(TransferError::Declaration {
                stream: self.stream.to_owned(),
                problem: "content was written before its size was declared",
            })
        })?;
        if buf.len() as u64 > declared - self.written {
            return Err(io::Error::other(TransferError::Overlong {
                stream: self.stream.to_owned(),
                declared,
            }));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The blocking side's writer: hands full chunks to the async side.
pub(super) struct ChannelWriter {
    pub(super) tx: mpsc::Sender<Bytes>,
    pub(super) buf: Vec<u8>,
}

impl ChannelWriter {
    pub(super) fn send_buf(&mut self) -> io::Result<()> {
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
pub(super) struct ChannelReader {
    pub(super) rx: mpsc::Receiver<Bytes>,
    pub(super) current: Bytes,
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
