//! Post-copy's side of the hold: `criu lazy-pages`, started before the
//! restore, and the page tunnel that feeds it from the source's CRIU.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use migrate_common::criu::lazy::{LazyPages, PS_SOCKET_FD};
use migrate_common::process::InheritedFds;
use migrate_common::protocol::{read_frame, StreamHeader, StreamKind};
use migrate_common::tunnel::{Inbound, Tunnel};

use crate::restore::{self, ContainerDir, RestorePlan};
use crate::Daemon;

/// A duplicate of the agent's end of the daemon's socket, held by the
/// daemon itself so that the socket outlives a dead agent.
const AGENT_END_FD: i32 = PS_SOCKET_FD + 1;
/// How long the lazy-pages daemon may take to listen for the restore.
const DAEMON_READY: Duration = Duration::from_secs(10);
/// Post-copy's moving parts.
#[derive(Debug)]
pub(super) struct Lazy {
    pub(super) daemon: LazyPages,
    pub(super) tunnel: Tunnel,
    pub(super) done: bool,
}

/// Starts `criu lazy-pages` for the final images and wires its socket to a
/// page tunnel.
pub(super) async fn start_lazy(
    daemon: &Daemon,
    dir: &ContainerDir,
    plan: RestorePlan,
) -> Result<Lazy> {
    let images = restore::final_images(dir, plan.parent_round)?;
    let (daemon_end, agent_end) =
        StdUnixStream::pair().context("creating the page-server socket pair")?;
    let mut fds = InheritedFds::default();
    fds.add(daemon_end.into(), PS_SOCKET_FD);
    fds.add(
        agent_end
            .try_clone()
            .context("duplicating the page-server socket")?
            .into(),
        AGENT_END_FD,
    );
    let mut lazy = LazyPages::spawn(&daemon.criu, &images, &dir.criu_work(), &fds)
        .context("starting criu lazy-pages")?;
    drop(fds);
    if let Err(e) = lazy.ready(DAEMON_READY).await {
        lazy.kill().await;
        return Err(e.into());
    }
    tracing::debug!("lazy-pages daemon ready");
    agent_end
        .set_nonblocking(true)
        .context("preparing the page-server socket")?;
    let socket =
        tokio::net::UnixStream::from_std(agent_end).context("preparing the page-server socket")?;
    Ok(Lazy {
        daemon: lazy,
        tunnel: Tunnel::new(socket, Inbound::Raw),
        done: false,
    })
}

pub(super) async fn wait_daemon(lazy: Option<&mut Lazy>) -> Result<u64> {
    let Some(lazy) = lazy else {
        return std::future::pending().await;
    };
    let outcome = lazy.daemon.wait().await?;
    Ok(outcome.pages.map(|(done, _)| done).unwrap_or_default())
}

/// Waits for the source to open the page tunnel on `conn`.
pub(super) async fn accept_tunnel(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream)> {
    let (send, mut recv) = conn
        .accept_bi()
        .await
        .context("waiting for the page tunnel")?;
    let header: StreamHeader = read_frame(&mut recv)
        .await?
        .ok_or_else(|| anyhow!("the page tunnel ended before its header"))?;
    if header.kind != StreamKind::PageTunnel as i32 {
        anyhow::bail!(
            "expected the page tunnel, got a stream of kind {}",
            header.kind
        );
    }
    Ok((send, recv))
}
