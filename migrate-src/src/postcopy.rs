//! Post-copy on the source, after `CheckpointSent`: relay CRIU's page server
//! to the destination's lazy-pages daemon until it has every page, replacing
//! a lost connection if the link breaks, and end the original only then.
//!
//! The decision point is the same as in the eager modes
//! ([`crate::conclude`]): the destination restores the container lazily and
//! holds it, not running, and says `Restored`; the source records its
//! decision and sends `Release`, and from then on the destination's copy
//! runs while its memory follows. Before the decision every failure goes
//! back (the original resumes, the held copy is discarded). After it no
//! failure resumes the original by itself: a lost link is reconnected for up
//! to `--resume-timeout`; after that the case is in doubt and both copies
//! stay held (the original frozen under CRIU with every page, the
//! destination copy waiting on the pages it lacks), because either choice
//! loses something and is the operator's (`migrate resolve`).

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use migrate_common::protocol::{
    write_frame, Body, Failed, PagesComplete, Release, Released, Restored, SourcePhase,
    StreamCodec, StreamHeader, StreamKind,
};
use migrate_common::transfer::bucket::Throttle;
use migrate_common::tunnel::{Inbound, Tunnel, TunnelError};
use tokio::sync::mpsc;

use crate::conclude::{decide, tail_section};
use crate::finish::Failure;
use crate::lazy::LazyEnd;
use crate::link::{self, Dial};
use crate::progress::Reporter;
use crate::signals::Signals;
use crate::Session;

/// What post-copy achieved.
#[derive(Debug)]
pub struct PagesMoved {
    pub restored: Restored,
    pub released: Released,
    /// When the destination said its copy runs: the end of the downtime.
    pub released_at: Instant,
    pub pages: PagesComplete,
    /// When CRIU ended the original.
    pub source_free_at: Instant,
    pub reconnects: u32,
    pub bytes_relayed: u64,
}

/// Why post-copy did not complete.
#[derive(Debug)]
pub enum PostCopyError {
    /// Before the decision: going back is safe.
    GoBack(Failure),
    /// After it: going on and going back both need an operator's decision.
    InDoubt { reason: String, released: bool },
}

#[derive(Debug, Default)]
struct Progress {
    /// The destination holds its copy, and the source decided for it.
    held: Option<Restored>,
    released: Option<(Released, Instant)>,
    pages: Option<PagesComplete>,
    source_free_at: Option<Instant>,
}

impl Progress {
    fn decided(&self) -> bool {
        self.held.is_some()
    }
}

/// Timing the loop needs from the options and the freeze, and the cap on
/// the pages it sends.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Before the decision: when the freeze timeout ends.
    pub freeze_deadline: tokio::time::Instant,
    pub freeze_timeout: Duration,
    pub resume_timeout: Duration,
    /// `--max-bandwidth`: the data streams' throttle, shared.
    pub page_cap: Option<Arc<Throttle>>,
}

pub async fn follow(
    session: &mut Session,
    dial: &Dial<'_>,
    bounds: Bounds,
    signals: &mut Signals,
    reporter: &Reporter,
) -> Result<PagesMoved, PostCopyError> {
    let Session {
        link,
        lazy,
        state,
        journal,
        migration_id,
        retired_wire_bytes,
        tunnel: kept_tunnel,
        ..
    } = session;
    let lazy = lazy
        .as_mut()
        .ok_or_else(|| PostCopyError::GoBack(Failure::Source(anyhow!("no lazy dump under way"))))?;
    let socket = lazy.socket.take().ok_or_else(|| {
        PostCopyError::GoBack(Failure::Source(anyhow!("the page-server socket is gone")))
    })?;
    let (close_gate, mut close_requests) = mpsc::channel(1);
    let tunnel = Tunnel::capped(
        socket,
        Inbound::CriuRequests { close_gate },
        bounds.page_cap.clone(),
    );
    // Kept where a rollback finds it: going back means aborting through it.
    *kept_tunnel = Some(tunnel.clone());
    let mut progress = Progress::default();
    // Before the decision a failure goes back; after it, it is in doubt.
    let fail = |progress: &Progress, failure: Failure| {
        if progress.decided() {
            PostCopyError::InDoubt {
                reason: failure_text(&failure),
                released: progress.released.is_some(),
            }
        } else {
            PostCopyError::GoBack(failure)
        }
    };
    let in_doubt = |reason: String, progress: &Progress| PostCopyError::InDoubt {
        reason,
        released: progress.released.is_some(),
    };
    let mut peer_delivered = 0;
    let mut reconnects = 0;
    let mut noted_signal = false;

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
                            // A frame that fails its checksum never reached
                            // CRIU: the link counts as lost, and a new one
                            // resends it from the destination's replay.
                            Err(TunnelError::Protocol(e)) => {
                                relay_done = true;
                                tracing::warn!(error = %e, "the page tunnel broke");
                                current.conn.close(1u32.into(), b"corrupt page tunnel frame");
                            }
                            Err(e) => return Err(fail(&progress, Failure::Source(e.into()))),
                        },
                        msg = current.control.recv() => {
                            let msg = match msg {
                                Ok(msg) => msg,
                                Err(e) if progress.decided() => break format!("{e:#}"),
                                Err(e) => return Err(PostCopyError::GoBack(Failure::Link(e))),
                            };
                            match msg.body {
                                Some(Body::Restored(restored)) if !progress.decided() => {
                                    decide(journal, state).map_err(PostCopyError::GoBack)?;
                                    progress.held = Some(restored);
                                    reporter.phase("releasing the destination's copy");
                                    if let Err(e) = current.control.send(Release {}).await {
                                        break format!("{e:#}");
                                    }
                                }
                                Some(Body::Released(released)) if progress.decided() && progress.released.is_none() => {
                                    state
                                        .advance(SourcePhase::ReceivingPages)
                                        .map_err(|e| in_doubt(e.to_string(), &progress))?;
                                    reporter.phase("running on the destination; memory follows");
                                    progress.released = Some((released, Instant::now()));
                                }
                                Some(Body::PagesComplete(pages)) if progress.released.is_some() => {
                                    progress.pages = Some(pages);
                                }
                                Some(Body::Failed(failed)) => {
                                    return Err(destination_failed(failed, &progress));
                                }
                                other => {
                                    return Err(fail(
                                        &progress,
                                        Failure::unexpected("Restored, Released or PagesComplete", other),
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
                                return Err(fail(&progress, Failure::Source(anyhow!(
                                    "CRIU's page transfer failed on the source; the original is frozen there"
                                ))));
                            }
                            Err(e) => return Err(fail(&progress, Failure::Source(e))),
                        },
                        () = tokio::time::sleep_until(bounds.freeze_deadline), if !progress.decided() => {
                            return Err(PostCopyError::GoBack(Failure::Timeout(bounds.freeze_timeout)));
                        }
                        signal = signals.next() => {
                            if !progress.decided() {
                                return Err(PostCopyError::GoBack(Failure::Interrupted(signal)));
                            }
                            if !noted_signal {
                                noted_signal = true;
                                reporter.note(format!(
                                    "{signal}: the container runs on the destination while its memory is still \
                                     moving; the migration goes on until every page is there (it cannot go back \
                                     by itself any more)"
                                ));
                            }
                        }
                    }
                    if let Some(done) = finished(&progress, reconnects, &tunnel) {
                        return Ok(done);
                    }
                }
            }
        };
        if !progress.decided() {
            return Err(PostCopyError::GoBack(Failure::Source(anyhow!(
                "lost the destination before the decision: {lost}"
            ))));
        }

        // The link is gone. If the destination already has every page, only
        // CRIU's end of the original is left to wait for.
        if progress.pages.is_some() {
            return wait_for_source(lazy, progress, reconnects, &tunnel).await;
        }
        reporter.note(format!(
            "lost the destination after the decision ({lost}); reconnecting for up to {}, both copies held",
            humantime::format_duration(bounds.resume_timeout)
        ));
        if let Some(old) = link.take() {
            *retired_wire_bytes += wire_bytes(&old.conn);
            old.abandon();
        }
        let deadline = Instant::now() + bounds.resume_timeout;
        let (new_link, status) = link::resume(dial, migration_id, tunnel.delivered(), deadline)
            .await
            .map_err(|e| in_doubt(format!("{e:#}"), &progress))?;
        reconnects += 1;
        reporter.note("the destination is back; the migration goes on where it stopped");
        peer_delivered = status.tunnel_delivered;
        if let Some(failed) = status.failed {
            return Err(destination_failed(failed, &progress));
        }
        let mut new_link = new_link;
        match (status.released, status.restored) {
            (Some(released), _) => {
                if progress.released.is_none() {
                    state
                        .advance(SourcePhase::ReceivingPages)
                        .map_err(|e| in_doubt(e.to_string(), &progress))?;
                    progress.released = Some((released, Instant::now()));
                }
            }
            (None, Some(_)) => {
                // Held still: the release did not arrive.
                new_link
                    .control
                    .send(Release {})
                    .await
                    .map_err(|e| in_doubt(format!("{e:#}"), &progress))?;
            }
            (None, None) => {
                return Err(in_doubt(
                    "the destination no longer holds its copy".into(),
                    &progress,
                ))
            }
        }
        if let Some(pages) = status.pages_complete {
            progress.pages = Some(pages);
        }
        *link = Some(new_link);
    }
}

fn failure_text(failure: &Failure) -> String {
    match failure {
        Failure::Source(e) => format!("{e:#}"),
        Failure::Link(e) => format!("{e:#}"),
        other => format!("{other:?}"),
    }
}

fn finished(progress: &Progress, reconnects: u32, tunnel: &Tunnel) -> Option<PagesMoved> {
    let (released, released_at) = progress.released.clone()?;
    Some(PagesMoved {
        restored: progress.held.clone()?,
        released,
        released_at,
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
                    released: true,
                })
            }
        }
    }
    finished(&progress, reconnects, tunnel).ok_or(PostCopyError::InDoubt {
        reason: "the link was lost before the destination confirmed the release".into(),
        released: false,
    })
}

fn destination_failed(failed: Failed, progress: &Progress) -> PostCopyError {
    if !progress.decided() {
        // It says it did not run the container and removed what it made.
        return PostCopyError::GoBack(Failure::Destination(failed));
    }
    PostCopyError::InDoubt {
        reason: format!(
            "the destination failed at {} after the decision: {}{}",
            failed.stage,
            failed.message,
            tail_section(&failed.criu_log_tail)
        ),
        released: progress.released.is_some(),
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
            // Tunnel frames, not a sized payload, and not compressed.
            declared_bytes: 0,
            offset: 0,
            codec: StreamCodec::None as i32,
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
