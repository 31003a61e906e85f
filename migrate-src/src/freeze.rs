//! Everything up to the decision point, in order: inspect the container,
//! choose the mode, connect and pass the destination's preflight, send the
//! layers it lacks and the upper dir while the container runs, pre-copy
//! rounds (pre-copy, hybrid), then the freeze and the final images and
//! rootfs changes, and `CheckpointSent`. When this returns, the destination
//! has all it needs to restore the container.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use migrate_common::criu::stats::DumpStats;
use migrate_common::criu::{ensure_pipe_max_size, Criu, CriuVersion, PipeMaxSize};
use migrate_common::protocol::{
    Body, CheckpointSent, Hello, LayersSent, MemoryMode, SourcePhase, SourceState, PROTOCOL_VERSION,
};
use migrate_common::transfer::bucket::Throttle;
use migrate_common::transfer::{Outbound, TransferStats};

use crate::checkpoint::{Checkpoint, DumpSetup, WorkDir};
use crate::digest_cache::DigestCache;
use crate::finish::Failure;
use crate::follow::PageFollower;
use crate::lazy::LazyDump;
use crate::link::{self, Dial, Link};
use crate::measure::LinkSamples;
use crate::mode::{self, ModeChoice, RequestedMode, SourceCapabilities};
use crate::progress::Reporter;
use crate::report::{CompressionReport, RoundReport};
use crate::{
    advance, convergence, inspect, measure, no_link, rounds, send, MigrateOptions, Session,
};

/// What the frozen step sent, for the summary.
#[derive(Debug)]
pub(crate) struct Frozen {
    pub choice: ModeChoice,
    pub started: Instant,
    pub frozen_at: Instant,
    pub dumped_at: Instant,
    pub stats: Arc<TransferStats>,
    pub rounds: Vec<RoundReport>,
    pub predicted_downtime_ms: Option<f64>,
    pub files: usize,
    pub layers_sent: usize,
    pub layers_reused: usize,
    pub layers_hashed: usize,
    /// How the frozen step's streams were encoded, and why.
    pub compression: CompressionReport,
    /// `--max-bandwidth`'s throttle, for the page tunnel to share.
    pub throttle: Option<Arc<Throttle>>,
}

impl Frozen {
    /// CRIU writes a dump's statistics once it has ended, after the images
    /// crossed; they complete the final round's line.
    pub(crate) fn count_final_pages(&mut self, session: &Session) {
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

/// Everything up to the decision point: the destination has all it needs
/// to restore the container once this returns.
pub(crate) async fn freeze_and_send(
    opts: &MigrateOptions,
    dial: &Dial<'_>,
    reporter: &Reporter,
    session: &mut Session,
) -> Result<Frozen, Failure> {
    let started = Instant::now();
    let id = opts.container_id.as_str();

    reporter.phase(format!("inspecting {id}"));
    let Inspected {
        container,
        criu_version,
        cpuinfo,
        choice,
        pipe_note,
    } = inspect_and_choose(opts).await.map_err(Failure::Source)?;
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
    session.source_pid = i32::try_from(container.state.pid).ok();
    session.host_ends = container
        .network
        .iter()
        .flat_map(|n| n.interfaces.iter().map(|i| i.host_peer.clone()))
        .collect();
    session
        .journal
        .as_mut()
        .ok_or_else(|| Failure::Source(anyhow!("no record of this migration")))?
        .start(
            &session.migration_id,
            &opts.destination,
            mode::name(choice.mode),
        )
        .map_err(|e| Failure::Source(anyhow!(e).context("recording the migration")))?;

    advance(session, SourcePhase::Connecting)?;
    reporter.phase(format!("connecting to {}", opts.destination));
    session.link = Some(Link::connect(dial).await.map_err(Failure::Source)?);

    advance(session, SourcePhase::Preflight)?;
    reporter.phase("preflight on the destination");
    let link = session.link.as_mut().ok_or_else(no_link)?;
    let hello = hello(
        opts,
        &container,
        &criu_version,
        cpuinfo,
        choice.mode,
        &session.migration_id,
    );
    let reply = link::preflight(link, hello).await?;
    if !reply.accepted {
        return Err(Failure::Refused(reply.refusals));
    }

    advance(session, SourcePhase::SendingLayers)?;
    let stats = Arc::new(TransferStats::default());
    let _ticker = reporter.track(stats.clone());
    let out = Outbound {
        stats: stats.clone(),
        encoding: measure::before_freeze(opts.compression),
        throttle: opts.max_bandwidth.map(|rate| Arc::new(Throttle::new(rate))),
    };
    let mut link_samples = LinkSamples::default();
    let layers_sent = reply.missing_layers.len();
    let layers_reused = container.layers.len().saturating_sub(layers_sent);
    if layers_sent > 0 {
        reporter.phase(format!("sending {layers_sent} layer(s)"));
    }
    let link = session.link.as_mut().ok_or_else(no_link)?;
    let sending = measure::Sending::start(&link.conn);
    let layer_files = send::send_layers(&link.conn, &container.layers, &reply.missing_layers, &out)
        .await
        .map_err(Failure::Source)?;
    sending.end(&link.conn, &mut link_samples);
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
    let sending = measure::Sending::start(&link.conn);
    let (upper_base, upper_snapshot) =
        send::send_upper_base(&link.conn, &container.overlay.upper, &out)
            .await
            .map_err(Failure::Source)?;
    sending.end(&link.conn, &mut link_samples);
    let work = session
        .work
        .insert(WorkDir::create(&opts.work_base, id).map_err(Failure::Source)?)
        .clone();
    std::fs::create_dir_all(work.final_dir())
        .with_context(|| format!("creating {}", work.final_dir().display()))
        .map_err(Failure::Source)?;
    session
        .journal
        .as_mut()
        .ok_or_else(|| Failure::Source(anyhow!("no record of this migration")))?
        .set_work_dir(&work.root)
        .map_err(|e| Failure::Source(anyhow!(e).context("recording the migration")))?;
    let record = session
        .journal
        .as_ref()
        .map(|j| j.path().to_owned())
        .ok_or_else(|| Failure::Source(anyhow!("no record of this migration")))?;
    let setup = DumpSetup {
        runc: &opts.runc,
        id,
        work: &work,
        migrate_exe: &opts.migrate_exe,
        record: &record,
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
            &out,
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
    for round in &rounds {
        link_samples.record(
            round.bytes_wire,
            std::time::Duration::from_secs_f64(round.transfer_s),
        );
    }
    let parent = rounds::parent_of(last_round);
    let final_dir = setup.work.final_dir();

    let link = session.link.as_ref().ok_or_else(no_link)?;
    let last_round_dir = (last_round > 0).then(|| setup.work.round_dir(last_round));
    let (encoding, compression) =
        measure::frozen_step(opts.compression, &link_samples, &link.conn, last_round_dir).await;
    reporter.note(format!("compression: {}", compression.reason));
    let frozen_out = out.with_encoding(encoding);

    advance(session, SourcePhase::Freezing)?;
    reporter.phase(if lazy {
        "lazy dump (container frozen)"
    } else {
        "checkpointing (container frozen)"
    });
    let link = session.link.as_ref().ok_or_else(no_link)?;
    let (raw_before, wire_before) = (stats.raw_bytes(), link.conn.stats().udp_tx.bytes);
    // An eager dump's memory goes while CRIU writes it; a lazy dump writes
    // none (it is served from the frozen processes).
    let follower = (!lazy).then(|| PageFollower::start(&link.conn, &final_dir, &frozen_out));
    let (frozen_at, dumped_at) = if lazy {
        let dump = session.lazy.insert(
            LazyDump::spawn(&setup, &final_dir, parent.as_deref()).map_err(Failure::Source)?,
        );
        record_holder(&mut session.journal, dump.holder_pid())?;
        dump.images_ready().await.map_err(Failure::Source)?;
        (dump.frozen_at, dump.dumped_at)
    } else {
        let dump = session.eager.insert(
            Checkpoint::spawn(&setup, &final_dir, parent.as_deref()).map_err(Failure::Source)?,
        );
        record_holder(&mut session.journal, dump.holder_pid())?;
        dump.images_ready().await.map_err(Failure::Source)?;
        (dump.frozen_at, dump.dumped_at)
    };

    let raw_during_dump = stats.raw_bytes() - raw_before;
    advance(session, SourcePhase::SendingCheckpoint)?;
    reporter.phase("sending checkpoint (container frozen)");
    let deadline = tokio::time::Instant::from_std(frozen_at + opts.freeze_timeout);
    let link = session.link.as_mut().ok_or_else(no_link)?;
    let mut files = tokio::time::timeout_at(
        deadline,
        send::send_checkpoint(
            &link.conn,
            &final_dir,
            &container.overlay.upper,
            upper_snapshot,
            follower,
            &frozen_out,
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
        bytes_raw_during_dump: raw_during_dump,
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

    let closed_connections = closed_connections(&container, opts.criu_options.tcp_established);

    // The decision point: from here the destination may run the container.
    advance(session, SourcePhase::AwaitingRestore)?;
    let link = session.link.as_mut().ok_or_else(no_link)?;
    link.control
        .send(CheckpointSent {
            files,
            parent_round: last_round,
            lazy,
            closed_connections,
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
        layers_hashed: container.layers_hashed,
        compression,
        throttle: out.throttle.clone(),
    })
}

/// The container as inspected, and how its memory will move.
#[derive(Debug)]
pub(crate) struct Inspected {
    pub container: inspect::Container,
    pub criu_version: CriuVersion,
    /// This host's `criu cpuinfo dump` image, for the destination's CPU
    /// check.
    pub cpuinfo: Vec<u8>,
    pub choice: ModeChoice,
    /// Said when this host's settings were changed for the mode.
    pub pipe_note: Option<String>,
}

/// Inspects the container and chooses the mode, off the async threads:
/// hashing layers and running criu block, and Ctrl-C must still be heard.
pub(crate) async fn inspect_and_choose(opts: &MigrateOptions) -> anyhow::Result<Inspected> {
    let (runc, criu, id, requested, state_dir) = (
        opts.runc.clone(),
        opts.criu.clone(),
        opts.container_id.clone(),
        opts.mode,
        opts.state_dir.clone(),
    );
    let (container, criu_version, cpuinfo, caps, pipe_note) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut cache = DigestCache::load(&state_dir);
            let container = inspect::inspect(&runc, &id, &mut cache)?;
            let version = criu.version().context("checking the source's CRIU")?;
            let cpuinfo = criu
                .cpuinfo_dump()
                .context("recording this host's CPU for the destination's check")?;
            let (caps, note) = capabilities(&criu, requested);
            Ok((container, version, cpuinfo, caps, note))
        })
        .await
        .context("inspecting the container")??;
    let choice = mode::choose(opts.mode, &caps).map_err(|e| anyhow!(e))?;
    Ok(Inspected {
        container,
        criu_version,
        cpuinfo,
        choice,
        pipe_note,
    })
}

/// The preflight's question: this container, moved this way.
pub(crate) fn hello(
    opts: &MigrateOptions,
    container: &inspect::Container,
    criu_version: &CriuVersion,
    cpuinfo: Vec<u8>,
    mode: MemoryMode,
    migration_id: &str,
) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        container_id: opts.container_id.clone(),
        config_json: container.config_json.clone(),
        layers: container.layers.iter().map(|l| l.info.clone()).collect(),
        upper_bytes: container.upper_bytes,
        memory_bytes: container.memory_bytes,
        source_criu_version: criu_version.to_string(),
        tcp_established: opts.criu_options.tcp_established,
        mode: mode as i32,
        migration_id: migration_id.to_owned(),
        criu_options: opts.criu_options.names(),
        preflight_only: false,
        cpuinfo,
        network: container.network.clone(),
    }
}

/// The container's TCP connections to peers outside it, for the
/// destination to reset when they are restored closed and its address
/// moves with it. Read frozen, after the dump: the sockets are still there
/// (held in repair mode), and no new one can appear. A failure to read
/// them only leaves their peers to time out, so it does not stop the move.
fn closed_connections(
    container: &inspect::Container,
    tcp_established: bool,
) -> Vec<migrate_common::protocol::TcpConnection> {
    if tcp_established || container.network.is_none() {
        return Vec::new();
    }
    match migrate_common::netns::open_connections(container.state.pid) {
        Ok(open) => open,
        Err(e) => {
            tracing::warn!(error = %e, "reading the container's connections; their peers will time out");
            Vec::new()
        }
    }
}

/// Notes in the record which process holds the source copy, for `migrate
/// resolve` to wait on.
fn record_holder(
    journal: &mut Option<crate::journal::Journal>,
    pid: Option<u32>,
) -> Result<(), Failure> {
    if let Some(journal) = journal.as_mut() {
        journal
            .set_holder(pid)
            .map_err(|e| Failure::Source(anyhow!(e).context("recording the dump's holder")))?;
    }
    Ok(())
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
