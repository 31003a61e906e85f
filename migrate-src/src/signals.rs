//! SIGINT and SIGTERM as events of the migration. Both are taken over for
//! the whole life of `migrate`, so that neither kills it halfway through a
//! rollback or a commit: each is read where the protocol says what it
//! means at that point (see [`crate::finish`]).
//!
//! `migrate cancel <id>` is a third such event, for one migration only: it
//! writes that migration's cancel request
//! ([`crate::journal::cancel_request_path`]) and sends SIGUSR2 to the
//! process holding its record. A process signal alone cannot name one
//! migration: a `migrate drain` runs several in one process, and SIGINT
//! would stop them all. Every migration of the process wakes on SIGUSR2;
//! only the one whose request exists takes it, as it would SIGINT.

use std::path::PathBuf;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a cancel request reads as, where a signal's name would be.
pub const CANCEL: &str = "migrate cancel";

#[derive(Debug)]
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    cancel: Signal,
    cancel_request: Option<PathBuf>,
}

impl Signals {
    /// Takes over SIGINT, SIGTERM and SIGUSR2 (whose default action would
    /// kill the process a `migrate cancel` found).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            cancel: signal(SignalKind::user_defined2())?,
            cancel_request: None,
        })
    }

    /// Also ends at SIGUSR2 when `request` exists: this migration's
    /// cancel request.
    pub fn with_cancel_request(mut self, request: PathBuf) -> Self {
        self.cancel_request = Some(request);
        self
    }

    /// The next signal's name ([`CANCEL`] for a cancel request).
    /// Cancel-safe.
    pub async fn next(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return "SIGINT",
                _ = self.terminate.recv() => return "SIGTERM",
                _ = self.cancel.recv() => {
                    if self.cancel_request.as_ref().is_some_and(|r| r.exists()) {
                        return CANCEL;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn sigusr2_ends_only_the_migration_whose_request_exists() {
        let dir = tempfile::tempdir().unwrap();
        let (mine, other) = (
            dir.path().join("mine.cancel"),
            dir.path().join("other.cancel"),
        );
        let mut requested = Signals::install()
            .unwrap()
            .with_cancel_request(mine.clone());
        let mut untouched = Signals::install().unwrap().with_cancel_request(other);
        std::fs::write(&mine, b"").unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGUSR2).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), requested.next()).await;
        assert_eq!(got.unwrap(), CANCEL);
        let quiet = tokio::time::timeout(Duration::from_millis(300), untouched.next()).await;
        assert!(
            quiet.is_err(),
            "a migration without a request was cancelled"
        );
    }
}
