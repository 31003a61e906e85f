//! The source agent: moves one running runc container to a destination
//! daemon. [`migrate`] drives the phases of [`SourceState`] in order;
//! [`freeze`] runs them up to the decision point, one file each:
//!
//! 1. [`inspect`]: find the container, its bundle, overlay rootfs and layers,
//!    and refuse one CRIU cannot dump ([`stopped`] tasks); [`mode`] picks how
//!    memory moves.
//! 2. [`link`]: QUIC with mutual TLS, and `Hello` for the destination's
//!    preflight verdict, before anything is frozen.
//! 3. [`send`]: lower layers the destination lacks, and the upper dir, while
//!    the container runs.
//! 4. [`rounds`] (pre-copy, hybrid): pre-dumps while the container runs.
//! 5. the freeze: [`checkpoint`] (held frozen in CRIU's post-dump) or
//!    [`lazy`] (memory served on demand); the final images and the upper
//!    dir's changes since step 3, then the manifest.
//! 6. the destination restores and holds its copy; the decision, recorded
//!    in [`journal`] before it is acted on, and the release: [`conclude`]
//!    (eager modes), or [`postcopy`], which also relays the pages.
//! 7. [`finish`]: the source copy ends and everything is cleaned up, or the
//!    container is resumed here, or the case is in doubt ([`resolve`]
//!    settles it later).

pub mod bandwidth;
pub mod cancel;
pub mod check;
pub mod checkpoint;
pub mod conclude;
pub mod convergence;
pub mod digest_cache;
pub mod drain;
pub mod finish;
pub mod follow;
pub mod freeze;
pub mod inspect;
pub mod journal;
pub mod lazy;
pub mod link;
pub mod measure;
pub mod mode;
pub mod postcopy;
pub mod progress;
pub mod ps;
pub mod report;
pub mod resolve;
pub mod rounds;
pub mod send;
pub mod signals;
pub mod status;
pub mod stopped;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use migrate_common::certs::TlsDir;
use migrate_common::criu::Criu;
use migrate_common::protocol::{MemoryMode, SourcePhase, SourceState};
use migrate_common::runc::{CriuOptions, Runc};
use migrate_common::transfer::compression::CompressionChoice;
use migrate_common::tunnel::Tunnel;

use checkpoint::{Checkpoint, WorkDir};
use finish::Failure;
pub use finish::{MigrationError, EXIT_IN_DOUBT, EXIT_LOST};
use freeze::Frozen;
use journal::{Earlier, Journal};
use lazy::LazyDump;
use link::{Dial, Link};
use mode::RequestedMode;
use progress::Reporter;
use report::{ModeReport, Summary};
use signals::Signals;

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
    /// Where the migrations' durable records live (on disk: they must
    /// survive a reboot).
    pub state_dir: PathBuf,
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
    /// `--compression`: whether the frozen step's streams are compressed.
    pub compression: CompressionChoice,
    /// `--max-bandwidth`: the most bytes per second the migration's data
    /// streams put on the link.
    pub max_bandwidth: Option<u64>,
}

/// What a migration has set in motion so far: what must be undone if it
/// fails, and where it stands.
#[derive(Debug)]
pub struct Session {
    state: SourceState,
    migration_id: String,
    link: Option<Link>,
    journal: Option<Journal>,
    work: Option<WorkDir>,
    /// The container's init on the source, as inspected.
    source_pid: Option<i32>,
    /// The host's ends of its interfaces, as inspected: gone with the
    /// source copy's namespace, or removed after it.
    host_ends: Vec<String>,
    eager: Option<Checkpoint>,
    lazy: Option<LazyDump>,
    tunnel: Option<Tunnel>,
    /// Wire bytes of connections already replaced.
    retired_wire_bytes: u64,
}

/// Moves the container; on failure the container runs on the source as
/// before, or is held in doubt (the error says which and what to do).
pub async fn migrate(
    opts: &MigrateOptions,
    reporter: &Reporter,
) -> Result<Summary, MigrationError> {
    let mut session = Session {
        state: SourceState::new(MemoryMode::StopAndCopy),
        migration_id: new_migration_id(),
        link: None,
        journal: None,
        work: None,
        source_pid: None,
        host_ends: Vec::new(),
        eager: None,
        lazy: None,
        tunnel: None,
        retired_wire_bytes: 0,
    };
    let tls = match TlsDir::load(&opts.tls_dir).context("loading TLS material") {
        Ok(tls) => tls,
        Err(e) => return Err(finish::untouched(Failure::Source(e), opts)),
    };
    let dial = Dial {
        destination: &opts.destination,
        tls: &tls,
        idle_timeout: opts.link_timeout,
    };
    let mut signals = match Signals::install().context("taking over SIGINT and SIGTERM") {
        Ok(signals) => signals.with_cancel_request(journal::cancel_request_path(
            &opts.state_dir,
            &opts.container_id,
        )),
        Err(e) => return Err(finish::untouched(Failure::Source(e), opts)),
    };
    match open_journal(opts, &tls, reporter).await {
        Ok(journal) => session.journal = Some(journal),
        Err(e) => return Err(finish::untouched(Failure::Source(e), opts)),
    }
    let frozen = tokio::select! {
        frozen = freeze::freeze_and_send(opts, &dial, reporter, &mut session) => frozen,
        signal = signals.next() => Err(Failure::Interrupted(signal)),
    };
    let frozen = match frozen {
        Ok(frozen) => frozen,
        Err(failure) => {
            reporter.phase("rolling back");
            return Err(finish::recover(session, failure, opts, &dial).await);
        }
    };
    if session.state.mode.is_lazy() {
        after_lazy_restore(session, frozen, opts, &dial, &mut signals, reporter).await
    } else {
        conclude::eager(session, frozen, opts, &dial, &mut signals, reporter).await
    }
}

/// Locks the container's record; an earlier migration interrupted before
/// its decision is settled first (its destination discards the copy it may
/// hold), one interrupted after it must be settled by `migrate resolve`.
async fn open_journal(
    opts: &MigrateOptions,
    tls: &TlsDir,
    reporter: &Reporter,
) -> anyhow::Result<Journal> {
    let (journal, earlier) = Journal::lock(&opts.state_dir, &opts.container_id)?;
    if let Earlier::Undecided(record) = earlier {
        reporter.note(format!(
            "an earlier migration of {} to {} was interrupted before its decision: settling it first",
            record.container_id, record.destination
        ));
        resolve::discard_undecided(&record, tls, opts, reporter)
            .await
            .context("settling the earlier migration (see `migrate resolve`)")?;
    }
    Ok(journal)
}

/// What every mode does once the source copy is gone: the final round's
/// figures, the cleanup and the commit; returns the warnings and the wire
/// bytes of every connection the migration used.
pub(crate) async fn wind_up(
    session: &mut Session,
    frozen: &mut Frozen,
    opts: &MigrateOptions,
    mut warnings: Vec<String>,
) -> (Vec<String>, u64) {
    frozen.count_final_pages(session);
    step(session, SourcePhase::Committing);
    warnings.extend(finish::clean_up(session, opts).await);
    let wire = session.retired_wire_bytes
        + session
            .link
            .as_ref()
            .map(|l| postcopy::wire_bytes(&l.conn))
            .unwrap_or(0);
    if let Some(link) = session.link.take() {
        link.close().await;
    }
    if let Some(journal) = session.journal.take() {
        if let Err(e) = journal.remove() {
            warnings.push(format!("removing the migration's record: {e}"));
        }
    }
    step(session, SourcePhase::Done);
    (warnings, wire)
}

/// A step the order of the code guarantees; a refusal is a bug, logged.
pub(crate) fn step(session: &mut Session, phase: SourcePhase) {
    if let Err(e) = session.state.advance(phase) {
        tracing::warn!(error = %e, "source state");
    }
}

/// Post-copy and hybrid: the destination runs the container as soon as it
/// is released, and its memory follows through the page tunnel.
async fn after_lazy_restore(
    mut session: Session,
    frozen: Frozen,
    opts: &MigrateOptions,
    dial: &Dial<'_>,
    signals: &mut Signals,
    reporter: &Reporter,
) -> Result<Summary, MigrationError> {
    reporter.phase("restoring on the destination (container frozen)");
    let bounds = postcopy::Bounds {
        freeze_deadline: tokio::time::Instant::from_std(frozen.frozen_at + opts.freeze_timeout),
        freeze_timeout: opts.freeze_timeout,
        resume_timeout: opts.resume_timeout,
        page_cap: frozen.throttle.clone(),
    };
    let moved = match postcopy::follow(&mut session, dial, bounds, signals, reporter).await {
        Ok(moved) => moved,
        Err(postcopy::PostCopyError::GoBack(failure)) => {
            reporter.phase("rolling back");
            return Err(finish::recover(session, failure, opts, dial).await);
        }
        Err(postcopy::PostCopyError::InDoubt { reason, released }) => {
            return Err(finish::in_doubt(session, reason, released, opts).await);
        }
    };
    step(&mut session, SourcePhase::Finishing);
    reporter.phase("finishing on the source");
    let mut frozen = frozen;
    let (warnings, wire) = wind_up(&mut session, &mut frozen, opts, Vec::new()).await;
    let mut summary = summary(
        opts,
        &frozen,
        moved.released_at,
        moved.restored.restore_ms,
        moved.released.release_ms,
        Some(&moved),
        wire,
        warnings,
    );
    summary.pages_after_restore_ms = Some(moved.pages.after_restore_ms);
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn summary(
    opts: &MigrateOptions,
    frozen: &Frozen,
    released_at: Instant,
    restore_ms: u64,
    release_ms: u64,
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
        downtime_ms: millis(released_at - frozen.frozen_at),
        predicted_downtime_ms: frozen.predicted_downtime_ms,
        total_ms: millis(frozen.started.elapsed()),
        dump_ms: millis(frozen.dumped_at - frozen.frozen_at),
        transfer_and_restore_ms: millis(released_at - frozen.dumped_at),
        restore_ms,
        release_ms,
        pages_after_restore_ms: None,
        source_free_ms: moved.map(|m| millis(m.source_free_at - frozen.frozen_at)),
        rounds: frozen.rounds.clone(),
        compression: frozen.compression.clone(),
        max_bandwidth: opts.max_bandwidth,
        bytes_raw: frozen.stats.raw_bytes(),
        bytes_compressed: frozen.stats.compressed_bytes(),
        bytes_pages: moved.map(|m| m.bytes_relayed).unwrap_or(0),
        bytes_wire,
        layers_sent: frozen.layers_sent,
        layers_reused: frozen.layers_reused,
        layers_hashed: frozen.layers_hashed,
        files: frozen.files,
        reconnects: moved.map(|m| m.reconnects).unwrap_or(0),
        warnings,
    }
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

pub(crate) fn advance(session: &mut Session, phase: SourcePhase) -> Result<(), Failure> {
    session
        .state
        .advance(phase)
        .map_err(|e| Failure::Source(e.into()))
}

pub(crate) fn no_link() -> Failure {
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
