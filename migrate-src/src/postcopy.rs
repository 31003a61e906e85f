//! Post-copy on the source, after `CheckpointSent`: relay CRIU's page server
//! to the destination's lazy-pages daemon until it has every page, replacing
//! a lost connection if the link breaks, and end the original only then.
//!
//! From here on the destination may run the container, so no failure makes
//! the source resume the original by itself: an explicit `Failed` from the
//! destination before it restored is the one way back. Otherwise a lost link
//! is reconnected for up to `--resume-timeout`; after that the case is in
//! doubt and both copies stay held (the original frozen under CRIU with every
//! page, the destination copy waiting on the pages it lacks), because either
//! choice loses something and is the operator's.

use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use migrate_common::protocol::{
    write_frame, Body, ControlMessage, Failed, PagesComplete, Restored, SourcePhase, StreamHeader,
    StreamKind,
};
use migrate_common::tunnel::{Inbound, Tunnel, TunnelError};
use tokio::sync::mpsc;

use crate::finish::Failure;
use crate::lazy::LazyEnd;
use crate::link::{self, Dial};
use crate::progress::Reporter;
use crate::Session;

/// What post-copy achieved.
#[derive(Debug)]
pub struct PagesMoved {
    pub restored: Restored,
    pub restored_at: Instant,
    pub pages: PagesComplete,
    /// When CRIU ended the original.
    pub source_free_at: Instant,
    pub reconnects: u32,
    pub bytes_relayed: u64,
}

/// Why post-copy did not complete.
#[derive(Debug)]
pub enum PostCopyError {
    /// The destination did not run the container: going back is safe.
    GoBack(Failure),
    /// Going on and going back both need an operator's decision.
    InDoubt { reason: String, restored: bool },
}

#[derive(Debug, Default)]
struct Progress {
    restored: Option<(Restored, Instant)>,
    pages: Option<PagesComplete>,
    source_free_at: Option<Instant>,
}

pub async fn follow(
    session: &mut Session,
    dial: &Dial<'_>,
    resume_timeout: Duration,
    reporter: &Reporter,
) -> Result<PagesMoved, PostCopyError> {
    let Session {
        link,
        lazy,
        state,
        migration_id,
        retired_wire_bytes,
        tunnel: kept_tunnel,
        ..
    } = session;
    let in_doubt = |reason: String, progress: &Progress| PostCopyError::InDoubt {
        reason,
        restored: progress.restored.is_some(),
    };
    let lazy = lazy
        .as_mut()
        .ok_or_else(|| PostCopyError::GoBack(Failure::Source(anyhow!("no lazy dump under way"))))?;
    let socket = lazy.socket.take().ok_or_else(|| {
        PostCopyError::GoBack(Failure::Source(anyhow!("the page-server socket is gone")))
    })?;
    let (close_gate, mut close_requests) = mpsc::channel(1);
    let tunnel = Tunnel::new(socket, Inbound::CriuRequests { close_gate });
    // Kept where a rollback finds it: going back means aborting through it.
    *kept_tunnel = Some(tunnel.clone());
    let mut progress = Progress::default();
    let mut peer_delivered = 0;
    let mut reconnects = 0;
    let mut interrupted = false;

    loop {
        let Some(current) = link.as_mut() else {
            return Err(in_doubt(
                "no connection to the destination".into(),
                &progress,
            ));
        };
        let lost = match open_tunnel(&current.conn).await {
            Err(e) => e,
            Ok((send, recv)) => {
                let mut relay = pin!(tunnel.run(send, recv, peer_delivered));
                let mut relay_done = false;
                loop {
                    tokio::select! {
                        ended = &mut relay, if !relay_done => match ended {
                            // CRIU has answered the daemon's close and gone:
                            // nothing is left to relay.
                            Err(TunnelError::Local(_)) if tunnel.close_seen() => relay_done = true,
                            // The stream ended or broke: either the link is
                            // lost, which the control stream shows too, or the
                            // destination gave up, which it says there.
                            Err(TunnelError::Link(_) | TunnelError::PeerClosed) | Ok(()) => {
                                relay_done = true;
                            }
                            Err(e) => return Err(in_doubt(format!("{e:#}"), &progress)),
                        },
                        msg = current.control.recv() => {
                            let msg = match msg {
                                Ok(msg) => msg,
                                Err(e) => break format!("{e:#}"),
                            };
                            match msg.body {
                                Some(Body::Restored(restored)) if progress.restored.is_none() => {
                                    state
                                        .advance(SourcePhase::ReceivingPages)
                                        .map_err(|e| in_doubt(e.to_string(), &progress))?;
                                    reporter.phase("running on the destination; memory follows");
                                    progress.restored = Some((restored, Instant::now()));
                                }
                                Some(Body::PagesComplete(pages)) => progress.pages = Some(pages),
                                Some(Body::Failed(failed)) => {
                                    return Err(destination_failed(failed, &progress));
                                }
                                other => {
                                    let got = ControlMessage { body: other }.kind();
                                    return Err(in_doubt(
                                        format!("the destination sent {got} during the page transfer"),
                                        &progress,
                                    ));
                                }
                            }
                        }
                        Some(allow) = close_requests.recv() => {
                            // The daemon has every page; CRIU ends the
                            // original once it reads the close.
                            if let Err(e) = lazy.thaw_for_the_end() {
                                return Err(in_doubt(format!("{e:#}"), &progress));
                            }
                            let _ = allow.send(());
                        }
                        end = lazy.ended() => match end {
                            Ok(LazyEnd::OriginalGone) => progress.source_free_at = Some(Instant::now()),
                            Ok(LazyEnd::OriginalKept) => {
                                return Err(in_doubt(
                                    "CRIU's page transfer failed on the source; the original is frozen there"
                                        .into(),
                                    &progress,
                                ));
                            }
                            Err(e) => return Err(in_doubt(format!("{e:#}"), &progress)),
                        },
                        _ = tokio::signal::ctrl_c() => {
                            if interrupted {
                                return Err(in_doubt("interrupted twice during the page transfer".into(), &progress));
                            }
                            interrupted = true;
                            reporter.note(
                                "the container may already run on the destination while its memory is still \
                                 moving: waiting for the transfer to end. Ctrl-C again stops now and leaves both \
                                 copies held, in doubt",
                            );
                        }
                    }
                    if let Some(done) = finished(&progress, reconnects, &tunnel) {
                        return Ok(done);
                    }
                }
            }
        };

        // The link is gone. If the destination already has every page, only
        // CRIU's end of the original is left to wait for.
        if progress.pages.is_some() {
            return wait_for_source(lazy, progress, reconnects, &tunnel).await;
        }
        reporter.note(format!(
            "lost the destination during the page transfer ({lost}); reconnecting for up to {}s, both copies held",
            resume_timeout.as_secs()
        ));
        if let Some(old) = link.take() {
            *retired_wire_bytes += wire_bytes(&old.conn);
            old.abandon();
        }
        let deadline = Instant::now() + resume_timeout;
        let resumed = tokio::select! {
            r = link::resume(dial, migration_id, tunnel.delivered(), deadline) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted while reconnecting")),
        };
        let (new_link, status) = resumed.map_err(|e| in_doubt(format!("{e:#}"), &progress))?;
        reconnects += 1;
        reporter.note("the destination is back; the page transfer goes on where it stopped");
        peer_delivered = status.tunnel_delivered;
        if let Some(failed) = status.failed {
            return Err(destination_failed(failed, &progress));
        }
        if let Some(restored) = status.restored {
            if progress.restored.is_none() {
                state
                    .advance(SourcePhase::ReceivingPages)
                    .map_err(|e| in_doubt(e.to_string(), &progress))?;
                progress.restored = Some((restored, Instant::now()));
            }
        }
        if let Some(pages) = status.pages_complete {
            progress.pages = Some(pages);
        }
        *link = Some(new_link);
    }
}

fn finished(progress: &Progress, reconnects: u32, tunnel: &Tunnel) -> Option<PagesMoved> {
    let (restored, restored_at) = progress.restored.clone()?;
    Some(PagesMoved {
        restored,
        restored_at,
        pages: progress.pages.clone()?,
        source_free_at: progress.source_free_at?,
        reconnects,
        bytes_relayed: tunnel.sent() + tunnel.delivered(),
    })
}

async fn wait_for_source(
    lazy: &mut crate::lazy::LazyDump,
    mut progress: Progress,
    reconnects: u32,
    tunnel: &Tunnel,
) -> Result<PagesMoved, PostCopyError> {
    if progress.source_free_at.is_none() {
        match lazy.ended().await {
            Ok(LazyEnd::OriginalGone) => progress.source_free_at = Some(Instant::now()),
            Ok(LazyEnd::OriginalKept) | Err(_) => {
                return Err(PostCopyError::InDoubt {
                    reason: "the destination had every page, but CRIU did not end the original"
                        .into(),
                    restored: true,
                })
            }
        }
    }
    finished(&progress, reconnects, tunnel).ok_or(PostCopyError::InDoubt {
        reason: "the link was lost before the destination reported the restore".into(),
        restored: false,
    })
}

fn destination_failed(failed: Failed, progress: &Progress) -> PostCopyError {
    if progress.restored.is_none() {
        // It says it did not run the container and removed what it made.
        return PostCopyError::GoBack(Failure::Destination(failed));
    }
    PostCopyError::InDoubt {
        reason: format!(
            "the destination failed at {} after the container started there: {}{}",
            failed.stage,
            failed.message,
            if failed.criu_log_tail.is_empty() {
                String::new()
            } else {
                format!("\ndestination CRIU log: {}", failed.criu_log_tail)
            }
        ),
        restored: true,
    }
}

/// Opens the page tunnel's stream on a connection.
async fn open_tunnel(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .context("opening the page tunnel")
        .map_err(|e| format!("{e:#}"))?;
    write_frame(
        &mut send,
        &StreamHeader {
            kind: StreamKind::PageTunnel as i32,
            name: String::new(),
            round: 0,
            // Tunnel frames, not a sized payload.
            declared_bytes: 0,
        },
    )
    .await
    .map_err(|e| format!("opening the page tunnel: {e}"))?;
    Ok((send, recv))
}

pub fn wire_bytes(conn: &quinn::Connection) -> u64 {
    let stats = conn.stats();
    stats.udp_tx.bytes + stats.udp_rx.bytes
}
