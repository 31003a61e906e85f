//! The source agent: moves one running runc container to a destination
//! daemon. [`migrate`] runs the phases in order, one file each:
//!
//! 1. [`inspect`]: find the container, its bundle, overlay rootfs and layers.
//! 2. connect: QUIC with mutual TLS ([`migrate_common::transport`]).
//! 3. preflight: `Hello`, and the destination's verdict, before any freeze.
//! 4. [`send::send_layers`]: lower layers the destination lacks.
//! 5. [`checkpoint`]: `runc checkpoint`, held frozen in CRIU's post-dump.
//! 6. [`send::send_checkpoint`]: images and upper dir, then the manifest.
//! 7. wait for the destination's restore.
//! 8. [`finish`]: let CRIU finish and clean up, or resume the container.

pub mod checkpoint;
pub mod finish;
pub mod inspect;
pub mod progress;
pub mod send;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use migrate_common::certs::TlsDir;
use migrate_common::criu::Criu;
use migrate_common::protocol::{
    Body, CheckpointSent, ControlChannel, Hello, LayersSent, PROTOCOL_VERSION,
};
use migrate_common::runc::{CriuOptions, Runc};
use migrate_common::transfer::TransferStats;
use migrate_common::transport;

use checkpoint::{Checkpoint, WorkDir};
use finish::Failure;
pub use finish::MigrationError;
use progress::{Reporter, Summary};

/// Everything the `migrate` command was asked to do.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub container_id: String,
    /// `host:port` of the destination daemon; `host` must match its
    /// certificate.
    pub destination: String,
    pub tls_dir: PathBuf,
    pub runc: Runc,
    pub criu: Criu,
    /// Base of the per-migration working dirs (on tmpfs: images are written
    /// there while the container is frozen).
    pub work_base: PathBuf,
    /// Longest the container may stay frozen waiting for the destination.
    pub freeze_timeout: Duration,
    pub ghost_limit: u64,
    pub criu_options: CriuOptions,
    /// This program, for CRIU's action script to call back.
    pub migrate_exe: PathBuf,
}

type Control = ControlChannel<quinn::RecvStream, quinn::SendStream>;

/// What a migration has set in motion so far: what must be undone if it
/// fails.
#[derive(Debug, Default)]
struct Session {
    endpoint: Option<quinn::Endpoint>,
    conn: Option<quinn::Connection>,
    control: Option<Control>,
    work: Option<WorkDir>,
    checkpoint: Option<Checkpoint>,
}

/// Moves the container; on failure the container runs on the source as
/// before, and the error says which side failed.
pub async fn migrate(
    opts: &MigrateOptions,
    reporter: &Reporter,
) -> Result<Summary, MigrationError> {
    let mut session = Session::default();
    let result = tokio::select! {
        result = run_phases(opts, reporter, &mut session) => result,
        _ = tokio::signal::ctrl_c() => Err(Failure::Interrupted),
    };
    match result {
        Ok(summary) => Ok(summary),
        Err(failure) => {
            reporter.phase("rolling back");
            Err(finish::roll_back(session, failure, opts).await)
        }
    }
}

async fn run_phases(
    opts: &MigrateOptions,
    reporter: &Reporter,
    session: &mut Session,
) -> Result<Summary, Failure> {
    let started = Instant::now();
    let id = opts.container_id.as_str();

    reporter.phase(format!("inspecting {id}"));
    // Hashing layers and running criu block; off the async threads, so that
    // Ctrl-C is still heard meanwhile.
    let (container, source_criu_version, pre_copy_available) = {
        let (runc, criu, id) = (opts.runc.clone(), opts.criu.clone(), id.to_owned());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let container = inspect::inspect(&runc, &id)?;
            let version = criu.version().context("checking the source's CRIU")?;
            Ok((container, version, criu.supports_dirty_tracking()))
        })
        .await
        .context("inspecting the container")
        .map_err(Failure::Source)?
        .map_err(Failure::Source)?
    };

    reporter.phase(format!("connecting to {}", opts.destination));
    let tls = TlsDir::load(&opts.tls_dir)
        .context("loading TLS material")
        .map_err(Failure::Source)?;
    let (endpoint, conn) = transport::connect(&opts.destination, &tls)
        .await
        .with_context(|| format!("connecting to {}", opts.destination))
        .map_err(Failure::Source)?;
    session.endpoint = Some(endpoint);
    session.conn = Some(conn.clone());
    let (send, recv) = conn
        .open_bi()
        .await
        .context("opening the control stream")
        .map_err(Failure::Source)?;
    let control = session.control.insert(ControlChannel::new(recv, send));

    reporter.phase("preflight on the destination");
    control
        .send(Hello {
            protocol_version: PROTOCOL_VERSION,
            container_id: id.to_owned(),
            config_json: container.config_json.clone(),
            layers: container.layers.iter().map(|l| l.info.clone()).collect(),
            upper_bytes: container.upper_bytes,
            memory_bytes: container.memory_bytes,
            source_criu_version: source_criu_version.to_string(),
            tcp_established: opts.criu_options.tcp_established,
        })
        .await
        .map_err(Failure::Link)?;
    let reply = match control.recv().await.map_err(Failure::Link)?.body {
        Some(Body::PreflightReply(reply)) => reply,
        other => return Err(Failure::unexpected("PreflightReply", other)),
    };
    if !reply.accepted {
        return Err(Failure::Refused(reply.refusals));
    }

    let stats = Arc::new(TransferStats::default());
    let _ticker = reporter.track(stats.clone());
    let layers_sent = reply.missing_layers.len();
    let layers_reused = container.layers.len().saturating_sub(layers_sent);
    if layers_sent > 0 {
        reporter.phase(format!("sending {layers_sent} layer(s)"));
    }
    let layer_files = send::send_layers(&conn, &container.layers, &reply.missing_layers, &stats)
        .await
        .map_err(Failure::Source)?;
    control
        .send(LayersSent { files: layer_files })
        .await
        .map_err(Failure::Link)?;
    match control.recv().await.map_err(Failure::Link)?.body {
        Some(Body::LayersReady(_)) => {}
        other => return Err(Failure::unexpected("LayersReady", other)),
    }

    reporter.phase("checkpointing (container frozen)");
    let work = session
        .work
        .insert(WorkDir::create(&opts.work_base, id).map_err(Failure::Source)?);
    let checkpoint = Checkpoint::start(
        &opts.runc,
        id,
        work,
        &opts.migrate_exe,
        opts.ghost_limit,
        opts.criu_options,
    )
    .await
    .map_err(Failure::Source)?;
    let frozen_at = checkpoint.frozen_at;
    let dumped_at = checkpoint.dumped_at;
    let image_dir = checkpoint.image_dir().to_owned();
    session.checkpoint = Some(checkpoint);

    reporter.phase("sending checkpoint (container frozen)");
    let control = session
        .control
        .as_mut()
        .ok_or_else(|| Failure::Source(anyhow!("control stream missing")))?;
    let restored = tokio::time::timeout(opts.freeze_timeout, async {
        let files = send::send_checkpoint(&conn, &image_dir, &container.overlay.upper, &stats)
            .await
            .map_err(Failure::Source)?;
        let file_count = files.len();
        control
            .send(CheckpointSent { files })
            .await
            .map_err(Failure::Link)?;
        reporter.phase("restoring on the destination (container frozen)");
        match control.recv().await.map_err(Failure::Link)?.body {
            Some(Body::Restored(restored)) => Ok((restored, file_count)),
            Some(Body::Failed(failed)) => Err(Failure::Destination(failed)),
            other => Err(Failure::unexpected("Restored", other)),
        }
    })
    .await
    .map_err(|_| Failure::Timeout(opts.freeze_timeout))??;
    let (restored, files) = restored;
    let restored_at = Instant::now();

    let link = conn.stats();
    reporter.phase("finishing on the source");
    let warnings = finish::complete(session, opts).await;

    Ok(Summary {
        container: id.to_owned(),
        destination: opts.destination.clone(),
        downtime_ms: millis(restored_at - frozen_at),
        total_ms: millis(started.elapsed()),
        dump_ms: millis(dumped_at - frozen_at),
        transfer_and_restore_ms: millis(restored_at - dumped_at),
        restore_ms: restored.restore_ms,
        bytes_raw: stats.raw_bytes(),
        bytes_compressed: stats.compressed_bytes(),
        bytes_wire: link.udp_tx.bytes + link.udp_rx.bytes,
        layers_sent,
        layers_reused,
        files,
        mode: "stop-and-copy",
        pre_copy_available,
        warnings,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
