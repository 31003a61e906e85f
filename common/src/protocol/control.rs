//! The control stream: one bidirectional stream of [`ControlMessage`] frames.
//!
//! Incoming frames are read by a task of their own and queued, so that
//! [`ControlChannel::recv`] can be one branch of a `select!` among others
//! (page transfer, signals, CRIU ending) without losing half a frame when
//! another branch wins.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::framing::{read_frame, write_frame, FrameError};
use super::messages::ControlMessage;

/// Frames read ahead of the consumer at most. One: a decoded frame can hold tens of times
/// its size in memory (prost gives each element of a repeated field its own struct), so a
/// peer that sends faster than it is read waits on the stream's flow control instead of
/// filling a queue (sixteen frames held 2.3 GiB).
const QUEUE: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the peer closed the control stream")]
    Closed,
}

#[derive(Debug)]
pub struct ControlChannel<W> {
    incoming: mpsc::Receiver<Result<ControlMessage, ControlError>>,
    reader: tokio::task::JoinHandle<()>,
    send: W,
}

impl<W> ControlChannel<W>
where
    W: AsyncWrite + Unpin,
{
    pub fn new<R>(recv: R, send: W) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (tx, incoming) = mpsc::channel(QUEUE);
        let reader = tokio::spawn(read_all(recv, tx));
        Self {
            incoming,
            reader,
            send,
        }
    }

    pub async fn send(&mut self, msg: impl Into<ControlMessage>) -> Result<(), ControlError> {
        write_frame(&mut self.send, &msg.into()).await?;
        Ok(())
    }

    /// The next message; a clean end of the stream is [`ControlError::Closed`]
    /// because every exchange ends with an explicit message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<ControlMessage, ControlError> {
        self.incoming
            .recv()
            .await
            .unwrap_or(Err(ControlError::Closed))
    }

    pub fn send_half(&mut self) -> &mut W {
        &mut self.send
    }
}

impl<W> Drop for ControlChannel<W> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_all<R: AsyncRead + Unpin>(
    mut recv: R,
    tx: mpsc::Sender<Result<ControlMessage, ControlError>>,
) {
    loop {
        let item = match read_frame(&mut recv).await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(ControlError::Closed),
            Err(e) => Err(ControlError::Frame(e)),
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}
