//! SIGINT and SIGTERM as events of the migration. Both are taken over for
//! the whole life of `migrate`, so that neither kills it halfway through a
//! rollback or a commit: each is read where the protocol says what it
//! means at that point (see [`crate::finish`]).

use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug)]
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal's name. Cancel-safe.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
