//! The destination daemon: accepts migrations over QUIC with mutual TLS and
//! restores the containers they carry. [`serve`] is the accept loop; a
//! connection opening with `Hello` is a new migration, driven by [`session`]
//! through the phases: [`preflight`], receiving layers and images
//! ([`receive`], [`store`]), [`restore`], and the hold until the source
//! decides ([`hold`]); one opening with `Resume` replaces the lost
//! connection of a migration whose copy is held (or, released in post-copy,
//! still receiving its pages), which the daemon keeps in its table. At
//! start-up [`restart`] adopts the copies an earlier run left held.

pub mod durable;
pub mod gc;
pub mod hold;
pub mod images;
pub mod network;
pub mod preflight;
pub mod prepare;
pub mod receive;
pub mod restart;
pub mod restore;
pub mod session;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use migrate_common::certs::TlsDir;
use migrate_common::criu::Criu;
use migrate_common::policy::Policy;
use migrate_common::protocol::{Body, ControlMessage, Failed, Resume, Resumed};
use migrate_common::runc::Runc;
use migrate_common::transport;
use tokio::sync::{mpsc, Semaphore};
use tracing::{info, warn, Instrument};

use images::ImageDir;
use store::LayerStore;

/// Migrations handled at once by default (`--max-migrations`); each holds a
/// container's images in the image dir and memory for its streams, and runs
/// CRIU.
pub const DEFAULT_MAX_MIGRATIONS: usize = 4;

/// Connections beyond `max_migrations` taken at once only to say why they
/// are refused (or to resume a held migration, which takes no slot); more
/// than this are refused by QUIC without a word.
const OVERFLOW_CONNECTIONS: usize = 16;

/// How long the daemon waits for the source to close the connection after
/// its last message.
const LAST_WORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What every session of this daemon shares.
#[derive(Debug)]
pub struct Daemon {
    pub state_dir: PathBuf,
    /// `--image-dir`, a tmpfs: where received images are held until the
    /// restore no longer needs them.
    pub images: ImageDir,
    pub runc: Runc,
    pub criu: Criu,
    /// Cgroup parent for restored containers; `None` keeps the source's.
    pub cgroup_parent: Option<String>,
    /// Which sources may push containers here, and what those may do.
    pub policy: Policy,
    pub store: Arc<LayerStore>,
    /// This program: runc calls it back as the network hook, and it runs
    /// each container's log shim.
    pub exe: PathBuf,
    /// After this long without its source, a held copy is reported in
    /// doubt (a report only: nothing acts on it).
    pub in_doubt_after: std::time::Duration,
    /// New migrations handled at once; more are refused at preflight, with
    /// why (see [`preflight::busy`]).
    pub max_migrations: usize,
    /// `--layer-store-max` and `--layer-max-age`: applied at start and
    /// after each migration.
    pub layer_limits: gc::Limits,
    /// Migrations whose copy is held or still needs its source, by
    /// migration id: where a connection that resumes one is handed.
    held: Mutex<HashMap<String, HeldEntry>>,
}

#[derive(Debug)]
struct HeldEntry {
    container_id: String,
    resumes: mpsc::Sender<ResumeRequest>,
}

/// A connection that says it carries on a held migration.
#[derive(Debug)]
pub struct ResumeRequest {
    pub conn: quinn::Connection,
    pub control: session::Control,
    pub resume: Resume,
    /// The certificate name of the peer that sent it.
    pub peer: Option<String>,
}

impl ResumeRequest {
    pub async fn reply(&mut self, resumed: Resumed) -> Result<()> {
        self.control.send(resumed).await?;
        Ok(())
    }
}

impl Daemon {
    pub fn new(
        state_dir: PathBuf,
        images: ImageDir,
        runc: Runc,
        criu: Criu,
        cgroup_parent: Option<String>,
        policy: Policy,
    ) -> Result<Self> {
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let store = Arc::new(LayerStore::open(state_dir.join("layers"))?);
        Ok(Self {
            state_dir,
            images,
            runc,
            criu,
            cgroup_parent,
            policy,
            store,
            exe: std::env::current_exe().context("locating the migrate-dst executable")?,
            in_doubt_after: std::time::Duration::from_secs(60),
            max_migrations: DEFAULT_MAX_MIGRATIONS,
            layer_limits: gc::Limits::default(),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Enters migration `id` in the table of held ones; connections that
    /// resume it arrive on the returned channel.
    pub fn hold(&self, id: &str, container_id: &str) -> mpsc::Receiver<ResumeRequest> {
        let (resumes, rx) = mpsc::channel(2);
        self.held_table().insert(
            id.to_owned(),
            HeldEntry {
                container_id: container_id.to_owned(),
                resumes,
            },
        );
        rx
    }

    pub fn release(&self, id: &str) {
        self.held_table().remove(id);
    }

    /// Removes unused layers beyond the limits, if there are limits; says
    /// what it removed in the log. A failure only leaves layers in place.
    pub fn apply_layer_limits(&self) {
        if self.layer_limits.is_none() {
            return;
        }
        match gc::collect(&self.store, &self.state_dir, &self.layer_limits, false) {
            Ok(report) => {
                for line in report.lines() {
                    info!("layer store: {line}");
                }
            }
            Err(e) => warn!(
                error = %format!("{:#}", anyhow::Error::from(e)),
                "applying the layer store's limits"
            ),
        }
    }

    fn held_table(&self) -> std::sync::MutexGuard<'_, HashMap<String, HeldEntry>> {
        // Every update is a single insert or remove.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands a resuming connection to its migration, or says why not.
    async fn route(&self, mut request: ResumeRequest) {
        // Without a migration id (`migrate resolve` without a record), the
        // container's id names it.
        let sender = {
            let table = self.held_table();
            let resume = &request.resume;
            if resume.migration_id.is_empty() {
                table
                    .values()
                    .find(|e| {
                        !resume.container_id.is_empty() && e.container_id == resume.container_id
                    })
                    .map(|e| e.resumes.clone())
            } else {
                table.get(&resume.migration_id).map(|e| e.resumes.clone())
            }
        };
        let refused = match sender {
            Some(sender) => match sender.send(request).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => {
                    request = back;
                    "the migration ended meanwhile"
                }
            },
            None => "no migration of that id is held here",
        };
        warn!(
            migration = request.resume.migration_id,
            refused, "refusing to resume"
        );
        let _ = request
            .control
            .send(Failed {
                stage: "resume".into(),
                message: format!("{refused} ({})", request.resume.migration_id),
                criu_log_tail: String::new(),
            })
            .await;
        // Dropping the connection would close it with the answer maybe
        // still in flight: the source closes once it has read it.
        let _ = request.control.send_half().finish();
        let _ = tokio::time::timeout(LAST_WORD_TIMEOUT, request.conn.closed()).await;
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
    let daemon = Arc::new(daemon);
    let adopted = restart::adopt(&daemon).await?;
    for id in restore::remove_stale(&daemon)? {
        info!(
            container = id,
            "removed state left by an interrupted migration"
        );
    }
    // A held copy's restore may still read its images; every other
    // migration of an earlier run has ended, and its images with it.
    let still_restoring = adopted
        .iter()
        .filter(|held| held.record().phase == migrate_common::record::DestinationPhase::Held)
        .map(|held| held.record().container_id.clone())
        .collect();
    for id in daemon.images.remove_orphans(&still_restoring)? {
        info!(container = id, "removed images left by an earlier run");
    }
    {
        let daemon = daemon.clone();
        tokio::task::spawn_blocking(move || daemon.apply_layer_limits()).await?;
    }
    let slots = Arc::new(Semaphore::new(daemon.max_migrations));
    let overflow = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    let mut sessions = tokio::task::JoinSet::new();
    for held in adopted {
        let daemon = daemon.clone();
        let container = held.record().container_id.clone();
        sessions.spawn(
            async move { restart::keep_holding(daemon, held).await }
                .instrument(tracing::info_span!("held", %container)),
        );
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let Some(incoming) = incoming else { break };
        // Without a slot, the connection is still taken: a `Resume` needs
        // none, and a `Hello` hears why it is refused.
        let (permit, overflow_permit) = match slots.clone().try_acquire_owned() {
            Ok(permit) => (Some(permit), None),
            Err(_) => match overflow.clone().try_acquire_owned() {
                Ok(overflow_permit) => (None, Some(overflow_permit)),
                Err(_) => {
                    warn!(peer = %incoming.remote_address(), "too many connections; refusing");
                    incoming.refuse();
                    continue;
                }
            },
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
                let peer = transport::peer_name(&conn);
                info!(name = peer.clone().unwrap_or_default(), "connected");
                match preflight::admit(&daemon, &conn).await {
                    Ok((mut control, Some(Body::Hello(hello))))
                        if permit.is_none() && !hello.preflight_only =>
                    {
                        warn!(
                            container = hello.container_id,
                            limit = daemon.max_migrations,
                            "too many migrations under way; refused"
                        );
                        if let Err(e) = preflight::busy(&mut control, daemon.max_migrations).await {
                            warn!(error = %format!("{e:#}"), "sending the refusal");
                        }
                    }
                    Ok((control, Some(Body::Hello(hello)))) => {
                        if let Err(e) =
                            session::serve(conn.clone(), control, hello, peer, daemon.clone()).await
                        {
                            warn!(error = %format!("{e:#}"), "migration ended with an error");
                        }
                        let _ =
                            tokio::task::spawn_blocking(move || daemon.apply_layer_limits()).await;
                    }
                    Ok((control, Some(Body::Resume(resume)))) => {
                        drop((permit, overflow_permit));
                        daemon
                            .route(ResumeRequest {
                                conn: conn.clone(),
                                control,
                                resume,
                                peer,
                            })
                            .await;
                        // The held migration owns the connection now, or
                        // the refusal has reached the source.
                        return;
                    }
                    Ok((_, other)) => warn!(
                        got = ControlMessage { body: other }.kind(),
                        "a connection opened with neither Hello nor Resume"
                    ),
                    Err(e) => warn!(error = %format!("{e:#}"), "reading the first message"),
                }
                // The source closes once it has read our last message;
                // closing first could discard that message in flight.
                let _ = tokio::time::timeout(LAST_WORD_TIMEOUT, conn.closed()).await;
                conn.close(0u32.into(), b"done");
                drop((permit, overflow_permit));
            }
            .instrument(tracing::info_span!("migration", %peer)),
        );
        while sessions.try_join_next().is_some() {}
    }
    info!("shutting down; waiting for migrations under way");
    // A copy held for a lost source may wait forever: its hook waits for
    // the next run of this daemon, which adopts it.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("leaving held copies to the next run of migrate-dst");
        sessions.abort_all();
    }
    endpoint.close(0u32.into(), b"shutdown");
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
    Ok(())
}

/// How long shutdown waits for migrations under way.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);
