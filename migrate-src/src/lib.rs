//! The source agent: moves one running runc container to a destination
//! daemon. [`migrate`] drives the phases of [`SourceState`] in order, one
//! file each:
//!
//! 1. [`inspect`]: find the container, its bundle, overlay rootfs and layers;
//!    [`mode`] picks how memory moves.
//! 2. [`link`]: QUIC with mutual TLS, and `Hello` for the destination's
//!    preflight verdict, before anything is frozen.
//! 3. [`send::send_layers`]: lower layers the destination lacks.
//! 4. [`rounds`] (pre-copy, hybrid): pre-dumps while the container runs.
//! 5. the freeze: [`checkpoint`] (held frozen in CRIU's post-dump) or
//!    [`lazy`] (paused, memory served on demand);
//!    [`send::send_checkpoint`]: the images and the rootfs, then the manifest.
//! 6. the destination restores; in post-copy [`postcopy`] relays the pages.
//! 7. [`finish`]: the source copy ends and everything is cleaned up, or the
//!    container is resumed here, or the case is in doubt.

pub mod checkpoint;
pub mod convergence;
pub mod finish;
pub mod inspect;
pub mod lazy;
pub mod link;
pub mod mode;
pub mod postcopy;
pub mod progress;
pub mod report;
pub mod rounds;
pub mod send;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use migrate_common::certs::TlsDir;
use migrate_common::criu::stats::DumpStats;
use migrate_common::criu::{ensure_pipe_max_size, Criu, PipeMaxSize};
use migrate_common::protocol::{
    Body, CheckpointSent, Hello, LayersSent, MemoryMode, SourcePhase, SourceState, PROTOCOL_VERSION,
};
use migrate_common::runc::{CriuOptions, Runc};
use migrate_common::transfer::TransferStats;
use migrate_common::tunnel::Tunnel;

use checkpoint::{Checkpoint, DumpSetup, WorkDir};
use finish::Failure;
pub use finish::{MigrationError, EXIT_IN_DOUBT};
use lazy::LazyDump;
use link::{Dial, Link};
use mode::{ModeChoice, RequestedMode, SourceCapabilities};
use progress::Reporter;
use report::{ModeReport, RoundReport, Summary};

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
    /// Longest the container may stay frozen before the destination has
    /// everything it needs to restore it.
    pub freeze_timeout: Duration,
    pub ghost_limit: u64,
    pub criu_options: CriuOptions,
    /// This program, for CRIU's action script to call back.
    pub migrate_exe: PathBuf,
    pub mode: RequestedMode,
    /// Pre-copy's downtime target.
    pub max_downtime: Duration,
    pub max_rounds: u32,
    /// Silence after which the link counts as lost.
    pub link_timeout: Duration,
    /// How long a lost link is reconnected during post-copy before the case
    /// is in doubt.
    pub resume_timeout: Duration,
}

/// What a migration has set in motion so far: what must be undone if it
/// fails, and where it stands.
#[derive(Debug)]
pub struct Session {
    state: SourceState,
    migration_id: String,
    link: Option<Link>,
    work: Option<WorkDir>,
    eager: Option<Checkpoint>,
    lazy: Option<LazyDump>,
    tunnel: Option<Tunnel>,
    /// Wire bytes of connections already replaced.
    retired_wire_bytes: u64,
}

/// What the frozen step sent, for the summary.
#[derive(Debug)]
struct Frozen {
    choice: ModeChoice,
    started: Instant,
    frozen_at: Instant,
    dumped_at: Instant,
    stats: Arc<TransferStats>,
    rounds: Vec<RoundReport>,
    predicted_downtime_ms: Option<f64>,
    files: usize,
    layers_sent: usize,
    layers_reused: usize,
}

impl Frozen {
    /// CRIU writes a dump's statistics once it has ended, after the images
    /// crossed; they complete the final round's line.
    fn count_final_pages(&mut self, session: &Session) {
        let (Some(work), Some(last)) = (session.work.as_ref(), self.rounds.last_mut()) else {
            return;
        };
        if let Ok(criu) = DumpStats::read(&work.final_dir()) {
            last.pages_written = criu.pages_written;
            last.pages_skipped = criu.pages_skipped_parent;
            last.pages_lazy = criu.pages_lazy;
        }
    }
}

/// Moves the container; on failure the container runs on the source as
/// before, or, in post-copy, is held on both sides in doubt; the error says
/// which.
pub async fn migrate(
    opts: &MigrateOptions,
    reporter: &Reporter,
) -> Result<Summary, MigrationError> {
    let mut session = Session {
        state: SourceState::new(MemoryMode::StopAndCopy),
        migration_id: new_migration_id(),
        link: None,
        work: None,
        eager: None,
        lazy: None,
        tunnel: None,
        retired_wire_bytes: 0,
    };
    let tls = match TlsDir::load(&opts.tls_dir).context("loading TLS material") {
        Ok(tls) => tls,
        Err(e) => return Err(finish::recover(session, Failure::Source(e), opts).await),
    };
    let dial = Dial {
        destination: &opts.destination,
        tls: &tls,
        idle_timeout: opts.link_timeout,
    };
    let frozen = tokio::select! {
        frozen = freeze_and_send(opts, &dial, reporter, &mut session) => frozen,
        _ = tokio::signal::ctrl_c() => Err(Failure::Interrupted),
    };
    let frozen = match frozen {
        Ok(frozen) => frozen,
        Err(failure) => {
            reporter.phase("rolling back");
            return Err(finish::recover(session, failure, opts).await);
        }
    };
    if session.state.mode.is_lazy() {
        after_lazy_restore(session, frozen, opts, &dial, reporter).await
    } else {
        after_eager_restore(session, frozen, opts, reporter).await
    }
}

/// Everything up to the decision point: the destination has all it needs
/// to restore the container once this returns.
async fn freeze_and_send(
    opts: &MigrateOptions,
    dial: &Dial<'_>,
    reporter: &Reporter,
    session: &mut Session,
) -> Result<Frozen, Failure> {
    let started = Instant::now();
    let id = opts.container_id.as_str();

    reporter.phase(format!("inspecting {id}"));
    // Hashing layers and running criu block; off the async threads, so that
    // Ctrl-C is still heard meanwhile.
    let (container, criu_version, caps, pipe_note) = {
        let (runc, criu, id, requested) = (
            opts.runc.clone(),
            opts.criu.clone(),
            id.to_owned(),
            opts.mode,
        );
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let container = inspect::inspect(&runc, &id)?;
            let version = criu.version().context("checking the source's CRIU")?;
            let (caps, note) = capabilities(&criu, requested);
            Ok((container, version, caps, note))
        })
        .await
        .context("inspecting the container")
        .map_err(Failure::Source)?
        .map_err(Failure::Source)?
    };
    let choice = mode::choose(opts.mode, &caps).map_err(|e| Failure::Source(anyhow!(e)))?;
    session.state = SourceState::new(choice.mode);
    if let Some(note) = pipe_note {
        reporter.note(note);
    }
    reporter.note(format!(
        "mode: {} ({})",
        mode::name(choice.mode),
        choice.reason
    ));
    let lazy = choice.mode.is_lazy();

    advance(session, SourcePhase::Connecting)?;
    reporter.phase(format!("connecting to {}", opts.destination));
    session.link = Some(Link::connect(dial).await.map_err(Failure::Source)?);

    advance(session, SourcePhase::Preflight)?;
    reporter.phase("preflight on the destination");
    let link = session.link.as_mut().ok_or_else(no_link)?;
    let reply = link::preflight(
        link,
        Hello {
            protocol_version: PROTOCOL_VERSION,
            container_id: id.to_owned(),
            config_json: container.config_json.clone(),
            layers: container.layers.iter().map(|l| l.info.clone()).collect(),
            upper_bytes: container.upper_bytes,
            memory_bytes: container.memory_bytes,
            source_criu_version: criu_version.to_string(),
            tcp_established: opts.criu_options.tcp_established,
            mode: choice.mode as i32,
            migration_id: session.migration_id.clone(),
        },
    )
    .await?;
    if !reply.accepted {
        return Err(Failure::Refused(reply.refusals));
    }

    advance(session, SourcePhase::SendingLayers)?;
    let stats = Arc::new(TransferStats::default());
    let _ticker = reporter.track(stats.clone());
    let layers_sent = reply.missing_layers.len();
    let layers_reused = container.layers.len().saturating_sub(layers_sent);
    if layers_sent > 0 {
        reporter.phase(format!("sending {layers_sent} layer(s)"));
    }
    let link = session.link.as_mut().ok_or_else(no_link)?;
    let layer_files =
        send::send_layers(&link.conn, &container.layers, &reply.missing_layers, &stats)
            .await
            .map_err(Failure::Source)?;
    link.control
        .send(LayersSent { files: layer_files })
        .await
        .map_err(Failure::Link)?;
    match link.control.recv().await.map_err(Failure::Link)?.body {
        Some(Body::LayersReady(_)) => {}
        other => return Err(Failure::unexpected("LayersReady", other)),
    }

    advance(session, SourcePhase::PreSending)?;
    reporter.phase("sending the rootfs changes (container running)");
    let link = session.link.as_mut().ok_or_else(no_link)?;
    let (upper_base, upper_snapshot) =
        send::send_upper_base(&link.conn, &container.overlay.upper, &stats)
            .await
            .map_err(Failure::Source)?;
    let work = session
        .work
        .insert(WorkDir::create(&opts.work_base, id).map_err(Failure::Source)?)
        .clone();
    std::fs::create_dir_all(work.final_dir())
        .with_context(|| format!("creating {}", work.final_dir().display()))
        .map_err(Failure::Source)?;
    let setup = DumpSetup {
        runc: &opts.runc,
        id,
        work: &work,
        migrate_exe: &opts.migrate_exe,
        ghost_limit: opts.ghost_limit,
        options: opts.criu_options,
    };

    let mut rounds = Vec::new();
    let mut last_round = 0;
    let mut predicted_downtime_ms = None;
    if matches!(choice.mode, MemoryMode::PreCopy | MemoryMode::Hybrid) {
        reporter.phase("pre-copy rounds (container running)");
        let policy = convergence::Policy {
            max_downtime_ms: opts.max_downtime.as_secs_f64() * 1000.0,
            max_rounds: opts.max_rounds,
        };
        let Session { state, link, .. } = &mut *session;
        let link = link.as_mut().ok_or_else(no_link)?;
        let pre_copy = rounds::run(
            &setup,
            link,
            &stats,
            policy,
            |round| {
                state
                    .advance(SourcePhase::PreCopyRound(round))
                    .map_err(anyhow::Error::from)
            },
            |report| reporter.note(format!("round {}", report.line())),
        )
        .await
        .map_err(Failure::Source)?;
        last_round = pre_copy.last_round;
        predicted_downtime_ms = pre_copy.verdict.and_then(|v| v.predicted_downtime_ms);
        rounds = pre_copy.reports;
    }
    let parent = rounds::parent_of(last_round);
    let final_dir = setup.work.final_dir();

    advance(session, SourcePhase::Freezing)?;
    reporter.phase(if lazy {
        "lazy dump (container frozen)"
    } else {
        "checkpointing (container frozen)"
    });
    let (frozen_at, dumped_at) = if lazy {
        let dump = LazyDump::start(&setup, &final_dir, parent.as_deref())
            .await
            .map_err(Failure::Source)?;
        let times = (dump.frozen_at, dump.dumped_at);
        session.lazy = Some(dump);
        times
    } else {
        let dump = Checkpoint::start(&setup, &final_dir, parent.as_deref())
            .await
            .map_err(Failure::Source)?;
        let times = (dump.frozen_at, dump.dumped_at);
        session.eager = Some(dump);
        times
    };

    advance(session, SourcePhase::SendingCheckpoint)?;
    reporter.phase("sending checkpoint (container frozen)");
    let deadline = tokio::time::Instant::from_std(frozen_at + opts.freeze_timeout);
    let link = session.link.as_mut().ok_or_else(no_link)?;
    let (raw_before, wire_before) = (stats.raw_bytes(), link.conn.stats().udp_tx.bytes);
    let mut files = tokio::time::timeout_at(
        deadline,
        send::send_checkpoint(
            &link.conn,
            &final_dir,
            &container.overlay.upper,
            upper_snapshot,
            &stats,
        ),
    )
    .await
    .map_err(|_| Failure::Timeout(opts.freeze_timeout))?
    .map_err(Failure::Source)?;
    files.push(upper_base);
    let file_count = files.len();
    let sent_at = Instant::now();
    rounds.push(RoundReport {
        round: last_round + 1,
        kind: if lazy { "lazy" } else { "final" },
        pages_written: 0,
        pages_skipped: 0,
        pages_lazy: 0,
        bytes_raw: stats.raw_bytes() - raw_before,
        bytes_wire: link.conn.stats().udp_tx.bytes - wire_before,
        dump_s: (dumped_at - frozen_at).as_secs_f64(),
        transfer_s: (sent_at - dumped_at).as_secs_f64(),
        predicted_downtime_ms,
        dirty_pages_per_s: None,
        link_bytes_per_s: None,
        decision: None,
    });

    if let Some(dump) = session.lazy.as_mut() {
        dump.fenced().await.map_err(Failure::Source)?;
    }

    // The decision point: from here the destination may run the container.
    advance(session, SourcePhase::AwaitingRestore)?;
    let link = session.link.as_mut().ok_or_else(no_link)?;
    link.control
        .send(CheckpointSent {
            files,
            parent_round: last_round,
            lazy,
        })
        .await
        .map_err(Failure::Link)?;
    Ok(Frozen {
        choice,
        started,
        frozen_at,
        dumped_at,
        stats,
        rounds,
        predicted_downtime_ms,
        files: file_count,
        layers_sent,
        layers_reused,
    })
}

/// Stop-and-copy and pre-copy: the destination restores from complete
/// images while the source copy waits, frozen, in CRIU's post-dump.
async fn after_eager_restore(
    mut session: Session,
    frozen: Frozen,
    opts: &MigrateOptions,
    reporter: &Reporter,
) -> Result<Summary, MigrationError> {
    reporter.phase("restoring on the destination (container frozen)");
    let deadline = tokio::time::Instant::from_std(frozen.frozen_at + opts.freeze_timeout);
    let restored = async {
        let link = session.link.as_mut().ok_or_else(no_link)?;
        let answer = tokio::select! {
            answer = tokio::time::timeout_at(deadline, link.control.recv()) => answer,
            _ = tokio::signal::ctrl_c() => return Err(Failure::Interrupted),
        };
        match answer
            .map_err(|_| Failure::Timeout(opts.freeze_timeout))?
            .map_err(Failure::Link)?
            .body
        {
            Some(Body::Restored(restored)) => Ok(restored),
            Some(Body::Failed(failed)) => Err(Failure::Destination(failed)),
            other => Err(Failure::unexpected("Restored", other)),
        }
    }
    .await;
    let restored = match restored {
        Ok(restored) => restored,
        Err(failure) => {
            reporter.phase("rolling back");
            return Err(finish::recover(session, failure, opts).await);
        }
    };
    let restored_at = Instant::now();
    let _ = session.state.advance(SourcePhase::Finishing);
    reporter.phase("finishing on the source");
    let mut frozen = frozen;
    let mut warnings = finish::end_source_copy(&mut session).await;
    frozen.count_final_pages(&session);
    warnings.extend(finish::clean_up(&mut session, opts).await);
    let _ = session.state.advance(SourcePhase::Committing);
    let wire = session.retired_wire_bytes
        + session
            .link
            .as_ref()
            .map(|l| postcopy::wire_bytes(&l.conn))
            .unwrap_or(0);
    if let Some(link) = session.link.take() {
        link.close().await;
    }
    let _ = session.state.advance(SourcePhase::Done);
    Ok(summary(
        opts,
        &frozen,
        restored_at,
        restored.restore_ms,
        None,
        wire,
        warnings,
    ))
}

/// Post-copy and hybrid: the destination runs the container at once, and
/// its memory follows through the page tunnel.
async fn after_lazy_restore(
    mut session: Session,
    frozen: Frozen,
    opts: &MigrateOptions,
    dial: &Dial<'_>,
    reporter: &Reporter,
) -> Result<Summary, MigrationError> {
    reporter.phase("restoring on the destination (container frozen)");
    let moved = match postcopy::follow(&mut session, dial, opts.resume_timeout, reporter).await {
        Ok(moved) => moved,
        Err(postcopy::PostCopyError::GoBack(failure)) => {
            reporter.phase("rolling back");
            return Err(finish::recover(session, failure, opts).await);
        }
        Err(postcopy::PostCopyError::InDoubt { reason, restored }) => {
            return Err(finish::in_doubt(session, reason, restored, opts).await);
        }
    };
    let _ = session.state.advance(SourcePhase::Finishing);
    reporter.phase("finishing on the source");
    let mut frozen = frozen;
    frozen.count_final_pages(&session);
    let warnings = finish::clean_up(&mut session, opts).await;
    let _ = session.state.advance(SourcePhase::Committing);
    let wire = session.retired_wire_bytes
        + session
            .link
            .as_ref()
            .map(|l| postcopy::wire_bytes(&l.conn))
            .unwrap_or(0);
    if let Some(link) = session.link.take() {
        link.close().await;
    }
    let _ = session.state.advance(SourcePhase::Done);
    let mut summary = summary(
        opts,
        &frozen,
        moved.restored_at,
        moved.restored.restore_ms,
        Some(&moved),
        wire,
        warnings,
    );
    summary.pages_after_restore_ms = Some(moved.pages.after_restore_ms);
    Ok(summary)
}

fn summary(
    opts: &MigrateOptions,
    frozen: &Frozen,
    restored_at: Instant,
    restore_ms: u64,
    moved: Option<&postcopy::PagesMoved>,
    bytes_wire: u64,
    warnings: Vec<String>,
) -> Summary {
    Summary {
        container: opts.container_id.clone(),
        destination: opts.destination.clone(),
        mode: ModeReport {
            requested: requested_name(opts.mode),
            used: mode::name(frozen.choice.mode),
            reason: frozen.choice.reason.clone(),
        },
        downtime_ms: millis(restored_at - frozen.frozen_at),
        predicted_downtime_ms: frozen.predicted_downtime_ms,
        total_ms: millis(frozen.started.elapsed()),
        dump_ms: millis(frozen.dumped_at - frozen.frozen_at),
        transfer_and_restore_ms: millis(restored_at - frozen.dumped_at),
        restore_ms,
        pages_after_restore_ms: None,
        source_free_ms: moved.map(|m| millis(m.source_free_at - frozen.frozen_at)),
        rounds: frozen.rounds.clone(),
        bytes_raw: frozen.stats.raw_bytes(),
        bytes_compressed: frozen.stats.compressed_bytes(),
        bytes_pages: moved.map(|m| m.bytes_relayed).unwrap_or(0),
        bytes_wire,
        layers_sent: frozen.layers_sent,
        layers_reused: frozen.layers_reused,
        files: frozen.files,
        reconnects: moved.map(|m| m.reconnects).unwrap_or(0),
        warnings,
    }
}

/// What this host offers the modes that were asked for; and a note when
/// it changed a kernel setting to offer it.
fn capabilities(criu: &Criu, requested: RequestedMode) -> (SourceCapabilities, Option<String>) {
    let dirty_tracking = matches!(
        requested,
        RequestedMode::Auto | RequestedMode::PreCopy | RequestedMode::Hybrid
    ) && criu.supports_dirty_tracking();
    let mut note = None;
    let mut lazy_problem = None;
    if matches!(requested, RequestedMode::PostCopy | RequestedMode::Hybrid) {
        match ensure_pipe_max_size() {
            Ok(PipeMaxSize::Enough(_)) => {}
            Ok(PipeMaxSize::Raised { from, to }) => {
                note = Some(format!(
                    "raised fs.pipe-max-size from {from} to {to}: CRIU's lazy page server needs it"
                ));
            }
            Err(e) => lazy_problem = Some(format!("{e:#}")),
        }
    }
    (
        SourceCapabilities {
            dirty_tracking,
            lazy_problem,
        },
        note,
    )
}

fn requested_name(mode: RequestedMode) -> &'static str {
    match mode {
        RequestedMode::Auto => "auto",
        RequestedMode::StopAndCopy => "stop-and-copy",
        RequestedMode::PreCopy => "pre-copy",
        RequestedMode::PostCopy => "post-copy",
        RequestedMode::Hybrid => "hybrid",
    }
}

fn advance(session: &mut Session, phase: SourcePhase) -> Result<(), Failure> {
    session
        .state
        .advance(phase)
        .map_err(|e| Failure::Source(e.into()))
}

fn no_link() -> Failure {
    Failure::Source(anyhow!("no connection to the destination"))
}

/// 16 random bytes, hex: names the migration when a connection is replaced.
fn new_migration_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // Unique enough within one host: only the destination's table of
        // held migrations is keyed by it, and the peer's name is checked too.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes[..16].copy_from_slice(&(nanos ^ u128::from(std::process::id())).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
