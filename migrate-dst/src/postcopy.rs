//! A lazy restore on the destination (post-copy, hybrid): the container is
//! restored before its memory is here, and runs while `criu lazy-pages`
//! fetches the pages it touches, then the rest, through the page tunnel to
//! the source's CRIU ([`migrate_common::tunnel`]).
//!
//! Once the copy runs it is the container, and its memory is still on the
//! source: a lost connection is waited out, for as long as it takes (the
//! source reconnects with `Resume`; after [`IN_DOUBT_AFTER`] the log says the
//! case is in doubt), and the copy is never given up except when the source
//! says so (`Abort`).

use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use migrate_common::criu::lazy::{LazyPages, PS_SOCKET_FD};
use migrate_common::process::InheritedFds;
use migrate_common::protocol::{
    read_frame, Body, Committed, Failed, Hello, PagesComplete, Restored, Resumed, StreamHeader,
    StreamKind, PROTOCOL_VERSION,
};
use migrate_common::tunnel::{Inbound, Tunnel};
use tracing::{info, warn};

use crate::restore::{self, ContainerDir, RestorePlan};
use crate::session::{same_peer, unexpected, Session};
use crate::{Daemon, ResumeRequest};

/// A duplicate of the agent's end of the daemon's socket, held by the
/// daemon itself so that the socket outlives a dead agent.
const AGENT_END_FD: i32 = PS_SOCKET_FD + 1;
/// How long the lazy-pages daemon may take to listen for the restore.
const DAEMON_READY: Duration = Duration::from_secs(10);
/// How long the source may take to close after our last message.
const LAST_WORD: Duration = Duration::from_secs(10);
/// After this long without the source, the log calls the case in doubt.
pub const IN_DOUBT_AFTER: Duration = Duration::from_secs(60);

/// How a lazy restore that did not complete must end.
#[derive(Debug)]
pub enum LazyEnd {
    /// Nothing of the container runs here: remove everything.
    Discard(anyhow::Error),
    /// A restored copy this side must not give up on its own.
    Keep(anyhow::Error),
}

#[derive(Debug, Default)]
struct Status {
    restored: Option<(Restored, Instant)>,
    pages: Option<PagesComplete>,
    failed: Option<Failed>,
}

pub async fn restore_lazily(
    session: &mut Session,
    daemon: &Arc<Daemon>,
    hello: &Hello,
    dir: &ContainerDir,
    plan: RestorePlan,
    peer: Option<String>,
) -> Result<(), LazyEnd> {
    let discard = |e: anyhow::Error| LazyEnd::Discard(e);
    let images = restore::final_images(dir, plan.parent_round).map_err(discard)?;
    let (daemon_end, agent_end) = StdUnixStream::pair()
        .context("creating the page-server socket pair")
        .map_err(discard)?;
    let mut fds = InheritedFds::default();
    fds.add(daemon_end.into(), PS_SOCKET_FD);
    fds.add(
        agent_end
            .try_clone()
            .context("duplicating the page-server socket")
            .map_err(discard)?
            .into(),
        AGENT_END_FD,
    );
    let mut lazy = LazyPages::spawn(&daemon.criu, &images, &dir.criu_work(), &fds)
        .context("starting criu lazy-pages")
        .map_err(discard)?;
    drop(fds);
    lazy.ready(DAEMON_READY)
        .await
        .map_err(|e| discard(e.into()))?;
    tracing::debug!("lazy-pages daemon ready");
    agent_end
        .set_nonblocking(true)
        .context("preparing the page-server socket")
        .map_err(discard)?;
    let socket = tokio::net::UnixStream::from_std(agent_end)
        .context("preparing the page-server socket")
        .map_err(discard)?;
    let tunnel = Tunnel::new(socket, Inbound::Raw);
    let mut resumes = daemon.hold(&hello.migration_id);
    let _registration = Registration {
        daemon: daemon.clone(),
        id: hello.migration_id.clone(),
    };

    let mut restoring = {
        let (daemon, hello, dir) = (daemon.clone(), hello.clone(), dir.clone());
        tokio::task::spawn_blocking(move || restore::restore(&daemon, &hello, &dir, plan))
    };
    let mut restore_done = false;
    let mut pages_done = false;
    let mut status = Status::default();
    let mut peer_delivered = 0;
    let mut lost_since: Option<Instant> = None;
    let id = hello.container_id.as_str();

    loop {
        // One connection's worth: relay pages while the link lasts.
        let link_up = session.control.is_some();
        let conn = session.conn.clone();
        let (relayed, from) = (&tunnel, peer_delivered);
        let mut relay_done = false;
        let mut relay = pin!(async move {
            if !link_up {
                return std::future::pending().await;
            }
            let (send, recv) = accept_tunnel(&conn).await?;
            relayed
                .run(send, recv, from)
                .await
                .map_err(anyhow::Error::from)
        });
        let lost = loop {
            tokio::select! {
                restored = &mut restoring, if !restore_done => {
                    restore_done = true;
                    match restored.map_err(|e| anyhow!("the restore task failed: {e}")) {
                        Ok(Ok(restored)) => {
                            info!(container = id, pid = restored.pid, ms = restored.restore_ms, "restored; memory follows");
                            status.restored = Some((restored.clone(), Instant::now()));
                            if let Err(e) = session.send(restored).await {
                                break format!("{e:#}");
                            }
                        }
                        Ok(Err(failed)) => {
                            let message = format!("{}: {}", failed.stage, failed.message);
                            lazy.kill().await;
                            let _ = session.send(failed).await;
                            return Err(LazyEnd::Discard(anyhow!("restore failed: {message}")));
                        }
                        Err(e) => {
                            lazy.kill().await;
                            return Err(LazyEnd::Discard(e));
                        }
                    }
                }
                // A daemon that ends before the restore does is explained
                // by the restore's outcome, which comes first.
                ended = lazy.wait(), if restore_done && !pages_done => {
                    pages_done = true;
                    match ended {
                        Ok(outcome) => {
                            let after_restore_ms = status
                                .restored
                                .as_ref()
                                .map(|(_, at)| millis(at.elapsed()))
                                .unwrap_or_default();
                            let pages = PagesComplete {
                                pages: outcome.pages.map(|(done, _)| done).unwrap_or_default(),
                                after_restore_ms,
                            };
                            info!(container = id, pages = pages.pages, after_restore_ms, "every page arrived");
                            status.pages = Some(pages.clone());
                            if let Err(e) = session.send(pages).await {
                                break format!("{e:#}");
                            }
                        }
                        Err(e) => {
                            // The copy (if it runs) lacks pages it can no
                            // longer get: the source still has them all.
                            let failed = Failed {
                                stage: "pages".into(),
                                message: format!("{e}"),
                                criu_log_tail: String::new(),
                            };
                            warn!(container = id, error = %e, "the lazy-pages daemon failed");
                            status.failed = Some(failed.clone());
                            if session.control.is_some() {
                                let _ = session.send(failed).await;
                            }
                            return Err(LazyEnd::Keep(anyhow!("the lazy-pages daemon failed: {e}")));
                        }
                    }
                }
                // Once the daemon has every page and has ended, nothing is
                // left to relay. A broken stream alone is not a lost link:
                // the control stream says which it is.
                ended = &mut relay, if !pages_done && !relay_done => {
                    relay_done = true;
                    if let Err(e) = ended {
                        warn!(container = id, error = %format!("{e:#}"), "the page tunnel broke");
                    }
                }
                msg = recv_if_up(session) => match msg {
                    Err(e) => break format!("{e:#}"),
                    Ok(msg) => match msg.body {
                        Some(Body::Commit(_)) => {
                            session.send(Committed {}).await.map_err(LazyEnd::Keep)?;
                            session_finish(session);
                            // This connection may be one that replaced the
                            // first: wait, as for that one, for the source
                            // to have read the last word before it goes.
                            let _ = tokio::time::timeout(LAST_WORD, session.conn.closed()).await;
                            return Ok(());
                        }
                        Some(Body::Abort(_)) => {
                            lazy.kill().await;
                            return Err(LazyEnd::Discard(unexpected(msg.body)));
                        }
                        other => return Err(LazyEnd::Keep(unexpected(other))),
                    },
                },
                Some(mut request) = resumes.recv() => {
                    if let Err(e) = take_over(&mut request, &peer, &tunnel, &status).await {
                        warn!(container = id, error = %format!("{e:#}"), "refused a connection claiming this migration");
                        continue;
                    }
                    let ResumeRequest { conn, control, resume, .. } = request;
                    info!(container = id, "the source is back; the page transfer goes on");
                    session.conn = conn;
                    session.control = Some(control);
                    peer_delivered = resume.tunnel_delivered;
                    lost_since = None;
                    if !pages_done {
                        lazy.unsuspend();
                    }
                    break String::new();
                }
                () = tokio::time::sleep(IN_DOUBT_AFTER), if lost_since.is_some() => {
                    if let Some(since) = lost_since {
                        warn!(container = id, lost_for_s = since.elapsed().as_secs(),
                            "in doubt: the source is gone while the restored container waits on its pages; \
                             holding it until the source comes back or an operator decides");
                    }
                }
            }
        };
        if !lost.is_empty() && session.control.is_some() {
            warn!(container = id, error = %lost, "lost the source during the page transfer; holding the container and waiting for it");
            session.control = None;
            lost_since = Some(Instant::now());
            if !pages_done {
                lazy.suspend();
            }
        }
    }
}

/// Answers a connection that resumes this migration, after checking it.
async fn take_over(
    request: &mut ResumeRequest,
    started_by: &Option<String>,
    tunnel: &Tunnel,
    status: &Status,
) -> Result<()> {
    same_peer(started_by, &request.peer)?;
    if request.resume.protocol_version != PROTOCOL_VERSION {
        anyhow::bail!(
            "protocol version {} is not this destination's {PROTOCOL_VERSION}",
            request.resume.protocol_version
        );
    }
    request
        .reply(Resumed {
            tunnel_delivered: tunnel.delivered(),
            restored: status.restored.as_ref().map(|(r, _)| r.clone()),
            pages_complete: status.pages.clone(),
            failed: status.failed.clone(),
        })
        .await
}

async fn recv_if_up(session: &mut Session) -> Result<migrate_common::protocol::ControlMessage> {
    if session.control.is_none() {
        return std::future::pending().await;
    }
    session.recv().await
}

fn session_finish(session: &mut Session) {
    if let Some(control) = session.control.as_mut() {
        let _ = control.send_half().finish();
    }
}

/// Waits for the source to open the page tunnel on `conn`.
async fn accept_tunnel(conn: &quinn::Connection) -> Result<(quinn::SendStream, quinn::RecvStream)> {
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

/// Removes the migration from the daemon's table of held ones when the
/// session ends, however it ends.
struct Registration {
    daemon: Arc<Daemon>,
    id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.daemon.release(&self.id);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
