//! From `CheckpointSent` on, on the destination: the restore, the hold, the
//! source's decision and, in post-copy, the page transfer.
//!
//! The container is restored and held at CRIU's post-restore step, not
//! running, and the source is told `Restored`; the destination's record
//! says `held` first. Then only the source decides: `Release` lets the copy
//! run (`Released`, and the record says so), `Abort` makes CRIU kill it and
//! everything made for it goes (`Discarded`). A lost source changes
//! nothing: the copy stays held (or, released in post-copy, keeps waiting
//! on its pages) until the source comes back with `Resume`, for as long as
//! that takes; after `--in-doubt-after` the log says the case is in doubt,
//! and `migrate-dst status` shows it. Nothing here releases or kills a held
//! copy on a guess.
//!
//! In post-copy `criu lazy-pages` starts before the restore and fetches the
//! pages the copy touches, then the rest, through the page tunnel to the
//! source's CRIU ([`migrate_common::tunnel`]).

mod lazy;

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use migrate_common::hook::Verdict;
use migrate_common::protocol::{
    Body, Committed, ControlMessage, Discarded, Failed, Hello, PagesComplete, Released, Restored,
    Resumed, PROTOCOL_VERSION,
};
use migrate_common::record::{self, DestinationPhase, DestinationRecord};
use migrate_common::tunnel::TunnelError;
use tracing::{error, info, warn};

use crate::prepare::Prepared;
use crate::restore::{self, ContainerDir, RestorePlan, Restoring};
use crate::session::{same_peer, Ending, Session};
use crate::{Daemon, ResumeRequest};
use lazy::{accept_tunnel, start_lazy, wait_daemon, Lazy};

/// How long the source may take to close after our last message.
const LAST_WORD: Duration = Duration::from_secs(10);
/// How long CRIU may take to kill a copy it was told to undo.
const UNDO_BOUND: Duration = Duration::from_secs(30);

/// Where the copy stands, as the source is told in `Resumed`.
#[derive(Debug, Default)]
struct Status {
    held: Option<Restored>,
    released: Option<(Released, Instant)>,
    pages: Option<PagesComplete>,
    failed: Option<Failed>,
}

/// A restored copy under this daemon's hold, and where it stands.
#[derive(Debug)]
pub struct Held {
    /// `None` once the copy runs and nothing waits on the restore.
    restoring: Option<Restoring>,
    lazy: Option<Lazy>,
    status: Status,
    rec: DestinationRecord,
    dir: ContainerDir,
}

impl Held {
    /// A copy a previous run of this daemon held or released, from its
    /// record (see [`crate::restart`]). A post-copy copy can only be
    /// discarded: its page transfer died with that daemon.
    pub fn adopted(daemon: &Daemon, dir: ContainerDir, rec: DestinationRecord) -> Result<Self> {
        let id = rec.container_id.clone();
        let pid = daemon.runc.state(&id).map(|s| s.pid).unwrap_or_default();
        let mut status = Status {
            held: Some(Restored { restore_ms: 0, pid }),
            ..Status::default()
        };
        let restoring = match rec.phase {
            DestinationPhase::Held => Some(Restoring::adopt(daemon, &id, &dir, rec.holder_pid)?),
            _ => {
                status.released = Some((Released { release_ms: 0 }, Instant::now()));
                None
            }
        };
        if rec.lazy && rec.phase == DestinationPhase::Held {
            status.failed = Some(Failed {
                stage: "resume".into(),
                message:
                    "migrate-dst restarted while holding this post-copy copy: its page transfer \
                          cannot resume, so it can only be discarded (`migrate resolve --go-back`)"
                        .into(),
                criu_log_tail: String::new(),
            });
        }
        Ok(Self {
            restoring,
            lazy: None,
            status,
            rec,
            dir,
        })
    }

    pub fn record(&self) -> &DestinationRecord {
        &self.rec
    }
}

/// Restores the container from the received images and drives it to its
/// end: committed, discarded, or held for a source that is gone.
pub async fn conclude(
    session: &mut Session,
    daemon: &Arc<Daemon>,
    hello: &Hello,
    dir: &ContainerDir,
    plan: RestorePlan,
    prepared: Prepared,
    peer: Option<String>,
) -> Result<(), Ending> {
    let id = hello.container_id.as_str();
    let mut lazy = match plan.lazy {
        true => Some(
            start_lazy(daemon, dir, plan)
                .await
                .map_err(Ending::Discard)?,
        ),
        false => None,
    };
    let mut restoring = match Restoring::start(daemon, hello, dir, plan, prepared) {
        Ok(restoring) => restoring,
        Err(failed) => {
            if let Some(lazy) = lazy.as_mut() {
                lazy.daemon.kill().await;
            }
            return Err(report_failure(session, failed).await);
        }
    };
    let rec = DestinationRecord {
        migration_id: hello.migration_id.clone(),
        container_id: id.to_owned(),
        source: peer,
        phase: DestinationPhase::Receiving,
        lazy: plan.lazy,
        holder_pid: restoring.holder_pid(),
    };
    if let Err(e) = record::store(&dir.record(), &rec) {
        return Err(undo(session, &mut restoring, lazy.as_mut(), anyhow!(e)).await);
    }
    let held = Held {
        restoring: Some(restoring),
        lazy,
        status: Status::default(),
        rec,
        dir: dir.clone(),
    };
    drive(session, daemon, held).await
}

/// Waits for the restore to hold, then for the source's word, replacing its
/// connection whenever it comes back.
pub async fn drive(session: &mut Session, daemon: &Arc<Daemon>, held: Held) -> Result<(), Ending> {
    let Held {
        restoring,
        mut lazy,
        mut status,
        mut rec,
        dir,
    } = held;
    let Some(mut restoring) = restoring else {
        return drive_released(session, daemon, &rec, &dir, &status).await;
    };
    let id = rec.container_id.clone();
    let id = id.as_str();
    let peer = rec.source.clone();
    let mut resumes = daemon.hold(&rec.migration_id, id);
    let _registration = Registration {
        daemon: daemon.clone(),
        id: rec.migration_id.clone(),
    };
    let mut releasing = false;
    let mut peer_delivered = 0;
    let mut lost_since = session.control.is_none().then(Instant::now);

    loop {
        // One connection's worth: relay pages while the link lasts.
        let conn = session.conn.clone().filter(|_| session.control.is_some());
        let tunnel = lazy.as_ref().map(|l| l.tunnel.clone());
        let from = peer_delivered;
        let mut relay_done = tunnel.is_none();
        let mut relay = pin!(async move {
            let (Some(tunnel), Some(conn)) = (tunnel, conn) else {
                return std::future::pending().await;
            };
            let (send, recv) = accept_tunnel(&conn).await?;
            tunnel
                .run(send, recv, from)
                .await
                .map_err(anyhow::Error::from)
        });
        let lost = loop {
            let pages_pending = lazy.as_ref().is_some_and(|l| !l.done);
            tokio::select! {
                event = restore_event(&mut restoring, status.held.is_none(), releasing) => match event {
                  RestoreEvent::Held(held) => match held {
                    Ok(restored) => {
                        if let Err(e) = restoring.upper_durable().await {
                            return Err(undo(session, &mut restoring, lazy.as_mut(), e).await);
                        }
                        rec.phase = DestinationPhase::Held;
                        if let Err(e) = record::store(&dir.record(), &rec) {
                            return Err(undo(session, &mut restoring, lazy.as_mut(), anyhow!(e)).await);
                        }
                        info!(container = id, ms = restored.restore_ms, "restored and held; waiting for the source's decision");
                        status.held = Some(restored.clone());
                        if let Err(e) = session.send(restored).await {
                            break format!("{e:#}");
                        }
                    }
                    Err(failed) => {
                        if let Some(lazy) = lazy.as_mut() {
                            lazy.daemon.kill().await;
                        }
                        return Err(report_failure(session, failed).await);
                    }
                  },
                  RestoreEvent::Ended(ended) => {
                    releasing = false;
                    match ended {
                        Ok(release_ms) => {
                            rec.phase = DestinationPhase::Released;
                            if let Err(e) = record::store(&dir.record(), &rec) {
                                warn!(container = id, error = %e, "recording the release");
                            }
                            info!(container = id, release_ms, "released: the container runs here");
                            let released = Released { release_ms };
                            status.released = Some((released.clone(), Instant::now()));
                            if let Err(e) = session.send(released).await {
                                break format!("{e:#}");
                            }
                            if let Some(pages) = status.pages.clone() {
                                if let Err(e) = session.send(pages).await {
                                    break format!("{e:#}");
                                }
                            }
                        }
                        Err(failed) => {
                            // The source ended its copy before releasing ours.
                            error!(container = id, stage = failed.stage, message = failed.message,
                                "LOST: the released copy did not come up");
                            if let Some(lazy) = lazy.as_mut() {
                                lazy.daemon.kill().await;
                            }
                            return Err(report_failure(session, failed).await);
                        }
                    }
                  }
                },
                ended = wait_daemon(lazy.as_mut()), if status.held.is_some() && pages_pending => {
                    if let Some(lazy) = lazy.as_mut() {
                        lazy.done = true;
                    }
                    match ended {
                        Ok(pages) => {
                            let after_restore_ms = status
                                .released
                                .as_ref()
                                .map(|(_, at)| millis(at.elapsed()))
                                .unwrap_or_default();
                            let pages = PagesComplete { pages, after_restore_ms };
                            info!(container = id, pages = pages.pages, after_restore_ms, "every page arrived");
                            status.pages = Some(pages.clone());
                            // Said only after the release: the source's
                            // state machine expects it there.
                            if status.released.is_some() {
                                if let Err(e) = session.send(pages).await {
                                    break format!("{e:#}");
                                }
                            }
                        }
                        Err(e) if status.released.is_none() && !releasing => {
                            // Nothing ran: the source still has every page.
                            return Err(undo(session, &mut restoring, None, e.context("the lazy-pages daemon failed")).await);
                        }
                        Err(e) => {
                            // The copy runs and lacks pages it can no longer
                            // get: the source still has them all.
                            let failed = Failed {
                                stage: "pages".into(),
                                message: format!("{e:#}"),
                                criu_log_tail: String::new(),
                            };
                            warn!(container = id, error = %format!("{e:#}"), "the lazy-pages daemon failed");
                            status.failed = Some(failed.clone());
                            let _ = session.send(failed).await;
                            return Err(Ending::Keep(anyhow!("the lazy-pages daemon failed: {e:#}")));
                        }
                    }
                }
                // A broken stream alone is not a lost link: the control
                // stream says which it is.
                ended = &mut relay, if pages_pending && !relay_done => {
                    relay_done = true;
                    if let Err(e) = ended {
                        warn!(container = id, error = %format!("{e:#}"), "the page tunnel broke");
                        // A frame that fails its checksum never reached CRIU;
                        // a new connection resends it from the source's replay.
                        if matches!(e.downcast_ref::<TunnelError>(), Some(TunnelError::Protocol(_))) {
                            if let Some(conn) = &session.conn {
                                conn.close(1u32.into(), b"corrupt page tunnel frame");
                            }
                            break format!("{e:#}");
                        }
                    }
                }
                msg = recv_if_up(session) => match msg {
                    Err(e) => break format!("{e:#}"),
                    Ok(msg) => match msg.body {
                        Some(Body::Release(_)) if status.failed.is_some() => {
                            warn!(container = id, "refusing to release a copy that cannot get its pages; holding it");
                        }
                        Some(Body::Release(_)) => {
                            info!(container = id, "the source decided: releasing");
                            restoring.decide(Verdict::Proceed);
                            releasing = true;
                        }
                        Some(Body::Abort(abort)) => {
                            info!(container = id, reason = abort.reason, "the source aborted: discarding the held copy");
                            settle_undo(&mut restoring, lazy.as_mut()).await;
                            discard(daemon, id, &dir).await;
                            let _ = session.send(Discarded {}).await;
                            finish(session).await;
                            return Ok(());
                        }
                        Some(Body::Commit(_)) => return commit(session, daemon, id, &dir).await,
                        other => break format!(
                            "unexpected {} from the source",
                            ControlMessage { body: other }.kind()
                        ),
                    },
                },
                Some(mut request) = resumes.recv() => {
                    let delivered = lazy.as_ref().map(|l| l.tunnel.delivered()).unwrap_or_default();
                    if let Err(e) = take_over(&mut request, &peer, delivered, &status, rec.lazy).await {
                        warn!(container = id, error = %format!("{e:#}"), "refused a connection claiming this migration");
                        continue;
                    }
                    let ResumeRequest { conn, control, resume, .. } = request;
                    info!(container = id, "the source is back");
                    session.conn = Some(conn);
                    session.control = Some(control);
                    peer_delivered = resume.tunnel_delivered;
                    lost_since = None;
                    if let Some(lazy) = lazy.as_mut().filter(|l| !l.done) {
                        lazy.daemon.unsuspend();
                    }
                    break String::new();
                }
                () = tokio::time::sleep(daemon.in_doubt_after), if lost_since.is_some() => {
                    match lost_since {
                        Some(since) if status.released.is_some() => {
                            warn!(container = id, lost_for_s = since.elapsed().as_secs(),
                                "the source is gone before its commit; the container runs here");
                        }
                        Some(since) => {
                            warn!(container = id, lost_for_s = since.elapsed().as_secs(), phase = ?rec.phase,
                                "in doubt: the source is gone and only it may decide; holding the copy until it \
                                 comes back (`migrate resolve` on the source)");
                        }
                        None => {}
                    }
                }
            }
        };
        if lost.is_empty() || session.control.is_none() {
            continue;
        }
        session.control = None;
        let needs_source = status.released.is_none() || lazy.as_ref().is_some_and(|l| !l.done);
        if !needs_source && !releasing {
            // Released with every page here: the container runs, and the
            // record stays until the source's commit, so that the source
            // (or `migrate resolve`) can still learn that it runs here.
            warn!(container = id, error = %lost, "lost the source before its commit; the container runs here, waiting for the commit");
            lost_since = Some(Instant::now());
            continue;
        }
        warn!(container = id, error = %lost, phase = ?rec.phase, "lost the source; holding the copy and waiting for it");
        lost_since = Some(Instant::now());
        if let Some(lazy) = lazy.as_mut().filter(|l| !l.done) {
            lazy.daemon.suspend();
        }
    }
}

/// An adopted copy that already runs: all that is left is the source's
/// commit, whenever it comes back.
async fn drive_released(
    session: &mut Session,
    daemon: &Arc<Daemon>,
    rec: &DestinationRecord,
    dir: &ContainerDir,
    status: &Status,
) -> Result<(), Ending> {
    let id = rec.container_id.as_str();
    let mut resumes = daemon.hold(&rec.migration_id, id);
    let _registration = Registration {
        daemon: daemon.clone(),
        id: rec.migration_id.clone(),
    };
    loop {
        if session.control.is_none() {
            let Some(mut request) = resumes.recv().await else {
                return Ok(());
            };
            if let Err(e) = take_over(&mut request, &rec.source, 0, status, rec.lazy).await {
                warn!(container = id, error = %format!("{e:#}"), "refused a connection claiming this migration");
                continue;
            }
            session.conn = Some(request.conn);
            session.control = Some(request.control);
        }
        match recv_if_up(session).await.map(|m| m.body) {
            Ok(Some(Body::Commit(_))) => return commit(session, daemon, id, dir).await,
            Ok(other) => warn!(
                container = id,
                got = ControlMessage { body: other }.kind(),
                "unexpected message for a released copy"
            ),
            Err(e) => warn!(container = id, error = %format!("{e:#}"), "lost the source again"),
        }
        session.control = None;
    }
}

enum RestoreEvent {
    Held(Result<Restored, Failed>),
    Ended(Result<u64, Failed>),
}

/// The restore's next event: the hold, or after the release its end.
async fn restore_event(
    restoring: &mut Restoring,
    want_held: bool,
    releasing: bool,
) -> RestoreEvent {
    if want_held {
        RestoreEvent::Held(restoring.held().await)
    } else if releasing {
        RestoreEvent::Ended(restoring.ended().await)
    } else {
        std::future::pending().await
    }
}

/// A restore that failed before the hold, or a released copy that did not
/// come up: the source hears why, and what was made goes.
async fn report_failure(session: &mut Session, failed: Failed) -> Ending {
    let message = format!("{}: {}", failed.stage, failed.message);
    let _ = session.send(failed).await;
    Ending::Discard(anyhow!("restore failed: {message}"))
}

/// Nothing ran and this side cannot go on: CRIU kills the held copy and
/// the source hears why.
async fn undo(
    session: &mut Session,
    restoring: &mut Restoring,
    lazy: Option<&mut Lazy>,
    cause: anyhow::Error,
) -> Ending {
    settle_undo(restoring, lazy).await;
    let failed = Failed {
        stage: "hold".into(),
        message: format!("{cause:#}"),
        criu_log_tail: String::new(),
    };
    report_failure(session, failed).await
}

/// Tells CRIU to kill the held copy and waits for `runc restore` to end,
/// so that nothing is left waiting on the hold.
async fn settle_undo(restoring: &mut Restoring, lazy: Option<&mut Lazy>) {
    restoring.decide(Verdict::Undo);
    if tokio::time::timeout(UNDO_BOUND, restoring.ended())
        .await
        .is_err()
    {
        warn!(
            pid = restoring.holder_pid(),
            "runc restore has not ended after the undo"
        );
    }
    if let Some(lazy) = lazy {
        lazy.daemon.kill().await;
    }
}

/// The source's commit: the migration is over, its record and images go
/// (the copy runs; the restore that read them has ended).
async fn commit(
    session: &mut Session,
    daemon: &Arc<Daemon>,
    id: &str,
    dir: &ContainerDir,
) -> Result<(), Ending> {
    // Before the answer, so that a committed migration has left nothing
    // in the image dir.
    restore::drop_images(daemon, id, dir);
    session.send(Committed {}).await.map_err(Ending::Keep)?;
    if let Err(e) = record::remove(&dir.record()) {
        warn!(container = id, error = %e, "removing the record");
    }
    finish(session).await;
    Ok(())
}

async fn discard(daemon: &Arc<Daemon>, id: &str, dir: &ContainerDir) {
    let (daemon, id, dir) = (daemon.clone(), id.to_owned(), dir.clone());
    let _ = tokio::task::spawn_blocking(move || restore::discard(&daemon, &id, &dir)).await;
}

/// Answers a connection that resumes this migration, after checking it.
async fn take_over(
    request: &mut ResumeRequest,
    started_by: &Option<String>,
    tunnel_delivered: u64,
    status: &Status,
    lazy: bool,
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
            tunnel_delivered,
            restored: status.held.clone(),
            pages_complete: status.pages.clone(),
            failed: status.failed.clone(),
            released: status.released.as_ref().map(|(r, _)| r.clone()),
            lazy,
        })
        .await
}

async fn recv_if_up(session: &mut Session) -> Result<ControlMessage> {
    if session.control.is_none() {
        return std::future::pending().await;
    }
    session.recv().await
}

/// Our last word is out: wait, as for the first connection, for the source
/// to have read it before the connection goes.
async fn finish(session: &mut Session) {
    if let Some(control) = session.control.as_mut() {
        let _ = control.send_half().finish();
    }
    if let Some(conn) = session.conn.as_ref() {
        let _ = tokio::time::timeout(LAST_WORD, conn.closed()).await;
    }
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
