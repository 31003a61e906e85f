//! One migration on the destination: drives [`DestinationState`] over the
//! control stream, from `Hello` to `Committed` or to a full rollback.

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use migrate_common::protocol::{
    Abort, Body, ControlChannel, ControlMessage, DestinationState, Direction, Failed, Hello,
    LayersReady,
};
use migrate_common::transfer::{ByteBudget, TransferStats};
use tracing::{info, warn};

use crate::receive::{self, Inbox};
use crate::restore::{self, ContainerDir};
use crate::{preflight, Daemon};

type Control = ControlChannel<quinn::RecvStream, quinn::SendStream>;

struct Session {
    control: Control,
    state: DestinationState,
}

impl Session {
    async fn send(&mut self, msg: impl Into<ControlMessage>) -> Result<()> {
        let msg = msg.into();
        self.state = self.state.next(Direction::Sent, &msg)?;
        self.control.send(msg).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<ControlMessage> {
        let msg = self.control.recv().await?;
        self.state = self.state.next(Direction::Received, &msg)?;
        Ok(msg)
    }
}

/// Serves one connection. Whatever happens, the destination ends up either
/// running the committed container or holding nothing of it.
pub async fn serve(conn: quinn::Connection, daemon: Arc<Daemon>) -> Result<()> {
    let (send, recv) = conn
        .accept_bi()
        .await
        .context("accepting the control stream")?;
    let mut session = Session {
        control: ControlChannel::new(recv, send),
        state: DestinationState::AwaitingHello,
    };
    let hello = match session.recv().await?.body {
        Some(Body::Hello(hello)) => hello,
        other => return Err(unexpected(other)),
    };
    info!(container = hello.container_id, "preflight");
    let checked = {
        let daemon = daemon.clone();
        let hello = hello.clone();
        tokio::task::spawn_blocking(move || preflight::run(&daemon, &hello)).await?
    };
    let accepted = checked.reply.accepted;
    let refusals = checked.reply.refusals.clone();
    let missing = checked.reply.missing_layers.clone();
    let free_bytes = checked.reply.free_bytes;
    if let Err(e) = session.send(checked.reply).await {
        if let Some(dir) = &checked.claimed {
            restore::discard(&daemon, &hello.container_id, dir);
        }
        return Err(e);
    }
    let Some(dir) = checked.claimed.filter(|_| accepted) else {
        info!(container = hello.container_id, ?refusals, "refused");
        let _ = session.control.send_half().finish();
        return Ok(());
    };

    let inbox = Arc::new(Inbox::default());
    inbox
        .targets
        .lock()
        .map_err(|_| anyhow!("inbox lock poisoned"))?
        .layers
        .extend(missing);
    let stats = Arc::new(TransferStats::default());
    let budget = Arc::new(ByteBudget::new(
        free_bytes.saturating_sub(preflight_reserve()),
    ));
    let acceptor = tokio::spawn(receive::accept_streams(
        conn.clone(),
        inbox.clone(),
        daemon.store.clone(),
        budget,
        stats.clone(),
    ));

    let mut acceptor = acceptor;
    let result = exchange(&mut session, &daemon, &hello, &dir, &inbox).await;
    match result {
        Ok(()) => {
            acceptor.abort();
            info!(
                container = hello.container_id,
                bytes_raw = stats.raw_bytes(),
                bytes_compressed = stats.compressed_bytes(),
                "migration committed"
            );
            restore::drop_images(&dir);
            Ok(())
        }
        Err(e) if session.state.holds_restored_container() => {
            // The source may already have let its copy go: this one must live.
            warn!(container = hello.container_id, error = %format!("{e:#}"), "link lost after restore; keeping the container");
            Err(e)
        }
        Err(e) => {
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
            Err(e)
        }
    }
}

/// How long a failed migration waits for the source to close the link
/// before closing it itself.
const STREAMS_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes of the free space the byte budget leaves untouched.
fn preflight_reserve() -> u64 {
    64 << 20
}

async fn exchange(
    session: &mut Session,
    daemon: &Arc<Daemon>,
    hello: &Hello,
    dir: &ContainerDir,
    inbox: &Inbox,
) -> Result<()> {
    let layer_files = match session.recv().await?.body {
        Some(Body::LayersSent(sent)) => sent.files,
        other => return Err(unexpected(other)),
    };
    inbox
        .verify(&layer_files)
        .await
        .context("receiving layers")?;
    for layer in &hello.layers {
        let digest = migrate_common::rootfs::digest::LayerDigest::parse(&layer.digest)?;
        if !daemon.store.has(&digest) {
            return Err(anyhow!(
                "layer {digest} is neither in the store nor was it sent"
            ));
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

    let manifest = match session.recv().await?.body {
        Some(Body::CheckpointSent(sent)) => sent.files,
        other => return Err(unexpected(other)),
    };
    inbox
        .verify(&manifest)
        .await
        .context("receiving the checkpoint")?;
    info!(
        container = hello.container_id,
        files = manifest.len(),
        "checkpoint verified; restoring"
    );

    let outcome = {
        let (daemon, hello, dir) = (daemon.clone(), hello.clone(), dir.clone());
        tokio::task::spawn_blocking(move || restore::restore(&daemon, &hello, &dir)).await?
    };
    match outcome {
        Ok(restored) => {
            info!(
                container = hello.container_id,
                pid = restored.pid,
                ms = restored.restore_ms,
                "restored"
            );
            session.send(restored).await?;
        }
        Err(failed) => {
            let message = format!("{}: {}", failed.stage, failed.message);
            session.send(failed).await?;
            return Err(anyhow!("restore failed: {message}"));
        }
    }

    match session.recv().await?.body {
        Some(Body::Commit(_)) => session.send(migrate_common::protocol::Committed {}).await?,
        // An abort here means the source kept its copy after all: the
        // caller removes ours, since the state no longer holds it.
        other => return Err(unexpected(other)),
    }
    let _ = session.control.send_half().finish();
    Ok(())
}

/// The error for a message the state machine admitted but that ends the
/// exchange: an abort from the source.
fn unexpected(body: Option<Body>) -> anyhow::Error {
    match body {
        Some(Body::Abort(Abort { reason })) => anyhow!("the source aborted: {reason}"),
        other => anyhow!("unexpected {}", ControlMessage { body: other }.kind()),
    }
}
