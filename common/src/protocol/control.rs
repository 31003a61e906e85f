//! The control stream: one bidirectional stream of [`ControlMessage`] frames.

use tokio::io::{AsyncRead, AsyncWrite};

use super::framing::{read_frame, write_frame, FrameError};
use super::messages::ControlMessage;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the peer closed the control stream")]
    Closed,
}

#[derive(Debug)]
pub struct ControlChannel<R, W> {
    recv: R,
    send: W,
}

impl<R, W> ControlChannel<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub fn new(recv: R, send: W) -> Self {
        Self { recv, send }
    }

    pub async fn send(&mut self, msg: impl Into<ControlMessage>) -> Result<(), ControlError> {
        write_frame(&mut self.send, &msg.into()).await?;
        Ok(())
    }

    /// The next message; a clean end of the stream is [`ControlError::Closed`]
    /// because every exchange ends with an explicit message.
    pub async fn recv(&mut self) -> Result<ControlMessage, ControlError> {
        read_frame(&mut self.recv)
            .await?
            .ok_or(ControlError::Closed)
    }

    pub fn send_half(&mut self) -> &mut W {
        &mut self.send
    }
}
