//! One migration on the destination: drives [`DestinationState`] over the
//! control stream, from `Hello` to `Committed` or to a full rollback; from
//! the checkpoint on, [`crate::hold`] restores, holds and releases.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use migrate_common::protocol::{
    Abort, Body, ControlChannel, ControlMessage, DestinationState, Direction, Discarded, Failed,
    Hello, LayersReady,
};
use migrate_common::rootfs::archive::UnpackPolicy;
use migrate_common::transfer::{ByteBudget, TransferStats};
use tracing::{info, warn};

use crate::prepare::prepare;
use crate::receive::{self, Budgets, Inbox, MAX_ROUNDS};
use crate::restore::{self, ContainerDir, RestorePlan};
use crate::{hold, network, preflight, Daemon};

pub type Control = ControlChannel<quinn::SendStream>;

/// The exchange of one migration; its connection may be replaced (post-copy).
#[derive(Debug)]
pub struct Session {
    /// `None` while the link is lost.
    pub control: Option<Control>,
    /// `None` for a held copy adopted at start-up, until its source is back.
    pub conn: Option<quinn::Connection>,
    pub state: DestinationState,
}

impl Session {
    /// Moves the state for `msg` and sends it; while the link is lost only
    /// the state moves (post-copy reports it in `Resumed`).
    pub async fn send(&mut self, msg: impl Into<ControlMessage>) -> Result<()> {
        let msg = msg.into();
        self.state = self.state.next(Direction::Sent, &msg)?;
        let control = self
            .control
            .as_mut()
            .ok_or_else(|| anyhow!("the link is lost"))?;
        control.send(msg).await?;
        Ok(())
    }

    pub async fn recv(&mut self) -> Result<ControlMessage> {
        let control = self
            .control
            .as_mut()
            .ok_or_else(|| anyhow!("the link is lost"))?;
        let msg = control.recv().await?;
        self.state = self.state.next(Direction::Received, &msg)?;
        Ok(msg)
    }

    fn finish(&mut self) {
        if let Some(control) = self.control.as_mut() {
            let _ = control.send_half().finish();
        }
    }
}

/// Serves one migration, from its `Hello`. Whatever happens, the destination
/// ends up running the committed container, holding a restored one it must
/// not give up (said in the log), or holding nothing of it.
pub async fn serve(
    conn: quinn::Connection,
    control: Control,
    hello: Hello,
    peer: Option<String>,
    daemon: Arc<Daemon>,
) -> Result<()> {
    let mut session = Session {
        control: Some(control),
        conn: Some(conn.clone()),
        state: DestinationState::AwaitingHello,
    };
    session.state = session
        .state
        .next(Direction::Received, &hello.clone().into())?;
    info!(container = hello.container_id, "preflight");
    let checked = {
        let daemon = daemon.clone();
        let hello = hello.clone();
        tokio::task::spawn_blocking(move || preflight::run(&daemon, &hello)).await?
    };
    let accepted = checked.reply.accepted;
    let refusals = checked.reply.refusals.clone();
    let missing = checked.reply.missing_layers.clone();
    let budgets = Budgets {
        disk: Arc::new(ByteBudget::new(
            checked.reply.free_bytes.saturating_sub(DISK_BUDGET_RESERVE),
        )),
        images: Arc::new(ByteBudget::for_space(
            checked
                .image_free_bytes
                .saturating_sub(IMAGE_BUDGET_RESERVE),
            "destination image space, --image-dir",
        )),
    };
    if let Err(e) = session.send(checked.reply).await {
        if let Some(dir) = &checked.claimed {
            restore::discard(&daemon, &hello.container_id, dir);
        }
        return Err(e);
    }
    if hello.preflight_only {
        info!(
            container = hello.container_id,
            accepted,
            ?refusals,
            "preflight only"
        );
        session.finish();
        return Ok(());
    }
    let Some(dir) = checked.claimed.filter(|_| accepted) else {
        info!(container = hello.container_id, ?refusals, "refused");
        session.finish();
        return Ok(());
    };

    let inbox = Arc::new(Inbox::new(&hello, UnpackPolicy::strict()));
    inbox
        .targets
        .lock()
        .map_err(|_| anyhow!("inbox lock poisoned"))?
        .layers
        .extend(missing);
    let stats = Arc::new(TransferStats::default());
    let mut acceptor = tokio::spawn(receive::accept_streams(
        conn.clone(),
        inbox.clone(),
        daemon.store.clone(),
        budgets,
        stats.clone(),
    ));

    let result = exchange(&mut session, &daemon, &hello, &dir, &inbox, peer).await;
    match result {
        Ok(()) if session.state == DestinationState::Aborted => {
            acceptor.abort();
            info!(
                container = hello.container_id,
                "migration aborted by the source; discarded"
            );
            Ok(())
        }
        Ok(()) => {
            acceptor.abort();
            info!(
                container = hello.container_id,
                bytes_raw = stats.raw_bytes(),
                bytes_compressed = stats.compressed_bytes(),
                "migration committed"
            );
            Ok(())
        }
        Err(Ending::Keep(e)) => {
            acceptor.abort();
            warn!(container = hello.container_id, state = ?session.state, error = %format!("{e:#}"),
                "keeping the restored container: the source may already have let its copy go");
            Err(e)
        }
        Err(Ending::Discard(e)) if session.state.holds_restored_container() => {
            // The source may already have let its copy go: this one must live.
            acceptor.abort();
            warn!(container = hello.container_id, error = %format!("{e:#}"), "link lost after restore; keeping the container");
            Err(e)
        }
        Err(Ending::Discard(e)) => {
            warn!(container = hello.container_id, state = ?session.state, error = %format!("{e:#}"), "rolling back");
            if !session.state.is_final() {
                let failed = Failed {
                    stage: format!("{:?}", session.state),
                    message: format!("{e:#}"),
                    criu_log_tail: String::new(),
                };
                let _ = session.send(failed).await;
            }
            // Streams still under way end when the source, told of the
            // failure, closes the connection; wait for them, so that nothing
            // writes into the directory about to be removed.
            if tokio::time::timeout(STREAMS_DRAIN_TIMEOUT, &mut acceptor)
                .await
                .is_err()
            {
                conn.close(1u32.into(), b"aborted");
                let _ = (&mut acceptor).await;
            }
            let (daemon, id, dir) = (daemon.clone(), hello.container_id.clone(), dir.clone());
            tokio::task::spawn_blocking(move || restore::discard(&daemon, &id, &dir)).await?;
            if session.state == DestinationState::Aborted {
                let _ = session.send(Discarded {}).await;
            }
            Err(e)
        }
    }
}

/// How a failed exchange must end.
#[derive(Debug)]
pub enum Ending {
    /// Remove everything made for the migration (unless the state says a
    /// restored container is held).
    Discard(anyhow::Error),
    /// A restored container whose fate is not ours to decide: keep it.
    Keep(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Ending {
    fn from(e: E) -> Self {
        Ending::Discard(e.into())
    }
}

/// How long a failed migration waits for the source to close the link
/// before closing it itself.
const STREAMS_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes of the state dir's free space the disk budget leaves untouched.
const DISK_BUDGET_RESERVE: u64 = 64 << 20;
/// Bytes of the image dir's free space the image budget leaves untouched.
const IMAGE_BUDGET_RESERVE: u64 = 16 << 20;

async fn exchange(
    session: &mut Session,
    daemon: &Arc<Daemon>,
    hello: &Hello,
    dir: &ContainerDir,
    inbox: &Inbox,
    peer: Option<String>,
) -> Result<(), Ending> {
    let layer_files = match recv_unless_failed(session, inbox).await?.body {
        Some(Body::LayersSent(sent)) => sent.files,
        other => return Err(unexpected(other).into()),
    };
    inbox
        .verify(&layer_files)
        .await
        .context("receiving layers")?;
    for layer in &hello.layers {
        let digest = migrate_common::rootfs::digest::LayerDigest::parse(&layer.digest)?;
        if !daemon.store.has(&digest) {
            return Err(anyhow!("layer {digest} is neither in the store nor was it sent").into());
        }
    }
    {
        let mut targets = inbox
            .targets
            .lock()
            .map_err(|_| anyhow!("inbox lock poisoned"))?;
        targets.images = Some(dir.images());
        targets.upper = Some(dir.upper());
    }
    session.send(LayersReady {}).await?;
    // While the source dumps: none of it waits for the images, so none of
    // it is left for the frozen step.
    let prepared = prepare(daemon, hello, dir).context("preparing the restore")?;

    let mut rounds = 0;
    let sent = loop {
        match recv_unless_failed(session, inbox).await?.body {
            Some(Body::RoundSent(round)) => {
                if round.round != rounds + 1 || round.round > MAX_ROUNDS {
                    return Err(anyhow!(
                        "pre-dump round {} announced after round {rounds}",
                        round.round
                    )
                    .into());
                }
                inbox
                    .verify(&round.files)
                    .await
                    .with_context(|| format!("receiving pre-dump round {}", round.round))?;
                rounds = round.round;
                info!(
                    container = hello.container_id,
                    round = rounds,
                    files = round.files.len(),
                    "pre-dump round verified"
                );
            }
            Some(Body::CheckpointSent(sent)) => break sent,
            other => return Err(unexpected(other).into()),
        }
    };
    if sent.parent_round != rounds {
        return Err(anyhow!(
            "the final dump builds on round {}, but {rounds} round(s) were sent",
            sent.parent_round
        )
        .into());
    }
    inbox
        .verify(&sent.files)
        .await
        .context("receiving the checkpoint")?;
    if hello.network.is_some() && !hello.tcp_established {
        network::note_closed(&dir.bundle(), &sent.closed_connections)
            .context("keeping the connections restored closed")?;
    }
    info!(
        container = hello.container_id,
        files = sent.files.len(),
        lazy = sent.lazy,
        "checkpoint verified; restoring"
    );
    let plan = RestorePlan {
        parent_round: sent.parent_round,
        lazy: sent.lazy,
    };
    hold::conclude(session, daemon, hello, dir, plan, prepared, peer).await
}

/// The next control message, unless a data stream fails first: then why,
/// so that the source hears the cause (a full disk, a corrupt stream) while
/// it may still be sending, not only that its streams were stopped.
async fn recv_unless_failed(session: &mut Session, inbox: &Inbox) -> Result<ControlMessage> {
    tokio::select! {
        msg = session.recv() => msg,
        failure = inbox.failure() => Err(failure),
    }
}

/// The error for a message the state machine admitted but that ends the
/// exchange: an abort from the source.
pub fn unexpected(body: Option<Body>) -> anyhow::Error {
    match body {
        Some(Body::Abort(Abort { reason })) => anyhow!("the source aborted: {reason}"),
        other => anyhow!("unexpected {}", ControlMessage { body: other }.kind()),
    }
}

/// Checks that a connection claiming to resume a migration comes from the
/// peer that started it.
pub fn same_peer(started_by: &Option<String>, resumed_by: &Option<String>) -> Result<()> {
    if started_by != resumed_by {
        bail!("the migration was started by {started_by:?}, not by {resumed_by:?}");
    }
    Ok(())
}
