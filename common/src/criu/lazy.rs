//! The destination's `criu lazy-pages` daemon: during a post-copy restore it
//! serves the restored processes' page faults with pages it fetches from the
//! source's CRIU, and fetches the rest in the background until every page has
//! arrived. It reaches the source over an inherited socket (`--ps-socket`),
//! which the destination agent relays over the migration's QUIC connection,
//! and it talks to `runc restore --lazy-pages` through `lazy-pages.socket` in
//! the shared CRIU work dir.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::{log_tail, Criu, CriuError, LOG_TAIL_LINES};
use crate::process::InheritedFds;

/// Descriptor number the daemon finds its page-server socket at.
pub const PS_SOCKET_FD: i32 = 100;
const LOG_FILE: &str = "lazy-pages.log";
const SOCKET_FILE: &str = "lazy-pages.socket";

/// A running lazy-pages daemon.
#[derive(Debug)]
pub struct LazyPages {
    child: tokio::process::Child,
    work_dir: PathBuf,
}

/// How the daemon ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyOutcome {
    /// Pages it copied into the restored processes, as its log counts them.
    pub pages: Option<(u64, u64)>,
}

impl LazyPages {
    /// Starts the daemon on `images` and `work_dir` (the work dir the restore
    /// will use). `fds` must hold the socket at [`PS_SOCKET_FD`]; the caller
    /// may add more descriptors the daemon should keep open.
    pub fn spawn(
        criu: &Criu,
        images: &Path,
        work_dir: &Path,
        fds: &InheritedFds,
    ) -> Result<Self, CriuError> {
        let mut cmd = std::process::Command::new(&criu.binary);
        cmd.arg("lazy-pages")
            .arg("--page-server")
            .arg("--ps-socket")
            .arg(PS_SOCKET_FD.to_string())
            .arg("--images-dir")
            .arg(images)
            .arg("--work-dir")
            .arg(work_dir)
            .args(["-o", LOG_FILE, "-v3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        fds.apply(&mut cmd);
        // Its own process group: a Ctrl-C meant for the daemon's terminal
        // must not end a transfer the restored container depends on.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| {
                CriuError::Tool(crate::process::ToolError::Spawn {
                    program: criu.binary.display().to_string(),
                    source,
                })
            })?;
        Ok(Self {
            child,
            work_dir: work_dir.to_owned(),
        })
    }

    /// Waits until the daemon listens for the restore, or fails with its log.
    pub async fn ready(&mut self, timeout: Duration) -> Result<(), CriuError> {
        let socket = self.work_dir.join(SOCKET_FILE);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().map_err(|source| CriuError::Lazy {
                message: format!("waiting for criu lazy-pages: {source}"),
                log: String::new(),
            })? {
                return Err(self.failure(&format!("exited before it was ready ({status})")));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.failure(&format!("not ready within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the daemon to end: success means every page arrived.
    pub async fn wait(&mut self) -> Result<LazyOutcome, CriuError> {
        let status = self.child.wait().await.map_err(|source| CriuError::Lazy {
            message: format!("waiting for criu lazy-pages: {source}"),
            log: String::new(),
        })?;
        if !status.success() {
            return Err(self.failure(&format!("ended with {status}")));
        }
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        Ok(LazyOutcome {
            pages: transferred_pages(&log),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops the daemon while no page can reach it (the link is lost): with
    /// requests outstanding and the restore finished, CRIU's daemon polls
    /// without waiting and would spin a CPU for the whole outage.
    pub fn suspend(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a suspended daemon go on.
    pub fn unsuspend(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            if let Err(e) = nix::sys::signal::kill(pid, signal) {
                tracing::warn!(error = %e, "sending {signal} to criu lazy-pages");
            }
        }
    }

    /// Ends the daemon (the restore it served failed or was abandoned).
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    pub fn log_path(&self) -> PathBuf {
        self.work_dir.join(LOG_FILE)
    }

    fn failure(&self, message: &str) -> CriuError {
        CriuError::Lazy {
            message: format!("criu lazy-pages {message}"),
            log: log_tail(&self.log_path(), LOG_TAIL_LINES),
        }
    }
}

/// The last "UFFD transferred pages: (done/total)" of a lazy-pages log.
fn transferred_pages(log: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("UFFD transferred pages:"))?;
    let inside = line.rsplit_once('(')?.1.split_once(')')?.0;
    let (done, total) = inside.split_once('/')?;
    Some((done.trim().parse().ok()?, total.trim().parse().ok()?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_transferred_page_count() {
        let log = "(00.54) uffd: 1-11: uffd_copy: 0x7ffcbe9ac000/12288\n\
                   (00.54) uffd: 1-11: UFFD transferred pages: (14679/14679)\n\
                   (00.54) page-xfer: Disconnect from the page server\n";
        assert_eq!(transferred_pages(log), Some((14679, 14679)));
        assert_eq!(transferred_pages("nothing here"), None);
    }
}
