//! The destination daemon: accepts migrations over QUIC with mutual TLS and
//! restores the containers they carry. [`serve`] is the accept loop; each
//! connection is one migration, driven by [`session`] through the phases:
//! [`preflight`], receiving layers and images ([`receive`], [`store`]), and
//! [`restore`].

pub mod preflight;
pub mod receive;
pub mod restore;
pub mod session;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use migrate_common::certs::TlsDir;
use migrate_common::criu::Criu;
use migrate_common::runc::Runc;
use migrate_common::transport;
use tokio::sync::Semaphore;
use tracing::{info, warn, Instrument};

use store::LayerStore;

/// Migrations handled at once; each holds a container's images on disk and
/// runs CRIU, so a few is plenty.
const MAX_CONCURRENT_MIGRATIONS: usize = 4;

/// How long the daemon waits for the source to close the connection after
/// its last message.
const LAST_WORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What every session of this daemon shares.
#[derive(Debug)]
pub struct Daemon {
    pub state_dir: PathBuf,
    pub runc: Runc,
    pub criu: Criu,
    /// Cgroup parent for restored containers; `None` keeps the source's.
    pub cgroup_parent: Option<String>,
    pub store: Arc<LayerStore>,
    /// This program: runc calls it back as the network hook, and it runs
    /// each container's log shim.
    pub exe: PathBuf,
}

impl Daemon {
    pub fn new(
        state_dir: PathBuf,
        runc: Runc,
        criu: Criu,
        cgroup_parent: Option<String>,
    ) -> Result<Self> {
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let store = Arc::new(LayerStore::open(state_dir.join("layers"))?);
        Ok(Self {
            state_dir,
            runc,
            criu,
            cgroup_parent,
            store,
            exe: std::env::current_exe().context("locating the migrate-dst executable")?,
        })
    }
}

/// Accepts migrations on `listen` until Ctrl-C or SIGTERM, then waits for the
/// ones under way.
pub async fn serve(listen: SocketAddr, tls: &TlsDir, daemon: Daemon) -> Result<()> {
    serve_on(transport::server_endpoint(listen, tls)?, daemon).await
}

/// [`serve`] on an endpoint the caller made (tests bind port 0 and read the
/// port back).
pub async fn serve_on(endpoint: quinn::Endpoint, daemon: Daemon) -> Result<()> {
    info!(addr = %endpoint.local_addr()?, "listening");
    daemon.store.remove_incomplete()?;
    for id in restore::remove_stale(&daemon)? {
        info!(
            container = id,
            "removed state left by an interrupted migration"
        );
    }
    let daemon = Arc::new(daemon);
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_MIGRATIONS));
    let mut sessions = tokio::task::JoinSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(peer = %incoming.remote_address(), "too many migrations under way; refusing");
            incoming.refuse();
            continue;
        };
        let daemon = daemon.clone();
        let peer = incoming.remote_address();
        sessions.spawn(
            async move {
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(error = %e, "handshake failed");
                        return;
                    }
                };
                info!(
                    name = transport::peer_name(&conn).unwrap_or_default(),
                    "connected"
                );
                if let Err(e) = session::serve(conn.clone(), daemon).await {
                    warn!(error = %format!("{e:#}"), "migration ended with an error");
                }
                // The source closes once it has read our last message;
                // closing first could discard that message in flight.
                let _ = tokio::time::timeout(LAST_WORD_TIMEOUT, conn.closed()).await;
                conn.close(0u32.into(), b"done");
                drop(permit);
            }
            .instrument(tracing::info_span!("migration", %peer)),
        );
        while sessions.try_join_next().is_some() {}
    }
    info!("shutting down; waiting for migrations under way");
    endpoint.close(0u32.into(), b"shutdown");
    while sessions.join_next().await.is_some() {}
    endpoint.wait_idle().await;
    Ok(())
}
