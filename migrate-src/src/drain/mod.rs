//! `migrate drain`: every running container of a runc root (or those a
//! filter keeps) moved to one of several destinations, a few at a time,
//! then a report per container and, if asked and every one moved, a reboot.
//!
//! 1. [`pidfile`]: one drain per state dir; `migrate cancel --drain` finds
//!    it there. SIGUSR1 (the cancel), SIGINT and SIGTERM stop the drain
//!    from starting any more migrations.
//! 2. [`schedule`]: `--at` waits.
//! 3. The containers are listed, filtered and ordered ([`select`]), every
//!    destination is asked for its preflight verdict on each
//!    ([`crate::check::preflight_only`], which freezes nothing), and
//!    [`plan`] places them. A dry run reports the plan and stops there.
//! 4. Each placed container is migrated by [`crate::migrate`], in this
//!    process, up to `--parallel` at once; [`report`] sums them up.
//!
//! The migrations run in-process rather than as child `migrate`s: each one
//! takes SIGINT and SIGTERM through its own tokio signal streams, and tokio
//! delivers a signal to every stream registered for it, so one signal
//! reaches every running migration (each rolls back at its own safe point)
//! and the drain's own stream too. A signal that arrives between a
//! migration's start and its taking over the signals is only seen by the
//! drain; that window is the few lines before [`crate::migrate`] loads its
//! TLS material.

pub mod pidfile;
pub mod plan;
pub mod progress;
pub mod report;
pub mod schedule;
pub mod select;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use migrate_common::certs::{CertError, TlsDir};
use migrate_common::process::ToolError;
use migrate_common::runc::RuncError;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::{MigrateOptions, MigrationError};
use pidfile::{DrainPid, PidFileError};
use plan::{Answer, Candidate, Placement};
use progress::DrainProgress;
use report::{DrainReport, Entry, Outcome, Reboot};
use schedule::{At, AtError};
use select::{Filter, Listed, Order};

/// Everything `migrate drain` was asked to do.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// `host:port` of each destination daemon, in the order ties go.
    pub destinations: Vec<String>,
    pub filter: Filter,
    pub order: Order,
    /// Migrations at once, at least 1.
    pub parallel: usize,
    pub stop_on_error: bool,
    pub dry_run: bool,
    pub at: Option<At>,
    /// The reboot command and its arguments, with `--reboot`.
    pub reboot: Option<Vec<String>>,
    /// Every migration's settings; the container and the destination are
    /// set for each.
    pub migration: MigrateOptions,
}

/// Why a drain could not run at all (each container's fate is in the
/// report otherwise).
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    PidFile(#[from] PidFileError),
    #[error("taking over SIGINT, SIGTERM and SIGUSR1")]
    Signals(#[source] std::io::Error),
    #[error("--at")]
    At(#[from] AtError),
    #[error("loading TLS material from {dir}")]
    Tls {
        dir: PathBuf,
        #[source]
        source: CertError,
    },
    #[error("listing the containers of runc root {root}")]
    List {
        root: PathBuf,
        #[source]
        source: RuncError,
    },
}

/// Drains as `opts` says. Every container's outcome is in the report;
/// an error means none was touched.
pub async fn drain(
    opts: &DrainOptions,
    progress: &DrainProgress,
) -> Result<DrainReport, DrainError> {
    // Signals first: SIGUSR1's default action would kill a drain that a
    // cancel found through its pid file before it took the signal over.
    let mut stop = watch_signals().map_err(DrainError::Signals)?;
    let _pid = DrainPid::claim(&opts.migration.state_dir)?;
    if let Some(at) = &opts.at {
        let when = at.resolve(SystemTime::now())?;
        wait_until(when, &mut stop, progress).await;
    }
    let tls = TlsDir::load(&opts.migration.tls_dir).map_err(|source| DrainError::Tls {
        dir: opts.migration.tls_dir.clone(),
        source,
    })?;
    let runc = &opts.migration.runc;
    let listed = runc.list().map_err(|source| DrainError::List {
        root: runc.root.clone(),
        source,
    })?;
    let mut running = Vec::new();
    for c in listed
        .into_iter()
        .filter(|c| opts.filter.rank(&c.id).is_some())
    {
        if c.is_running() {
            running.push(c.id);
        } else {
            // Only running containers move; the others are said, not counted.
            progress.note(format!("{} is {}, not running: left alone", c.id, c.status));
        }
    }
    progress.set_total(running.len());
    if running.is_empty() {
        progress.note(format!(
            "no running container to move in {}",
            runc.root.display()
        ));
    }

    let mut candidates = Vec::new();
    for id in &running {
        if stopped(&stop).is_some() {
            break;
        }
        candidates.push(ask(opts, &tls, id, progress).await);
    }
    let sizes: Vec<Listed> = candidates
        .iter()
        .map(|c: &Candidate| Listed {
            id: c.container.clone(),
            memory_bytes: c.memory_bytes,
        })
        .collect();
    let order = select::select(&sizes, &opts.filter, opts.order);
    let ordered: Vec<Candidate> = order
        .iter()
        .filter_map(|id| candidates.iter().find(|c| &c.container == id).cloned())
        .collect();
    let placements = plan::place(&ordered);

    let (mut entries, halted) = if opts.dry_run {
        let entries: Vec<Entry> = placements.iter().map(would).collect();
        entries.iter().for_each(|e| progress.done(e));
        (entries, None)
    } else {
        run(opts, placements, &mut stop, progress).await
    };
    // Listed but never asked: the drain was stopped during the preflights.
    let why = halted.or_else(|| stopped(&stop));
    for id in running.iter().filter(|id| !order.contains(id)) {
        let entry = Entry::staying(id, Outcome::Skipped, not_started(why.as_deref()));
        progress.done(&entry);
        entries.push(entry);
    }
    let mut report = DrainReport::new(opts.dry_run, opts.destinations.clone(), entries, why);
    if let (Some(command), false) = (&opts.reboot, opts.dry_run) {
        report.set_reboot(reboot(command, &report, progress));
    }
    Ok(report)
}

/// The drain's stop: set once, with why, by the first SIGUSR1, SIGINT or
/// SIGTERM.
fn watch_signals() -> std::io::Result<watch::Receiver<Option<String>>> {
    let mut cancel = signal(SignalKind::user_defined1())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let why = tokio::select! {
            _ = cancel.recv() => "SIGUSR1 (migrate cancel --drain)",
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        let _ = tx.send(Some(format!("stopped by {why}")));
        // Later signals are for the migrations under way (their own
        // streams see them); the drain has already stopped.
        tx.closed().await;
    });
    Ok(rx)
}

fn stopped(stop: &watch::Receiver<Option<String>>) -> Option<String> {
    stop.borrow().clone()
}

fn not_started(why: Option<&str>) -> String {
    format!(
        "not started: the drain was {}",
        why.unwrap_or("stopped before this container")
    )
}

async fn wait_until(
    when: SystemTime,
    stop: &mut watch::Receiver<Option<String>>,
    progress: &DrainProgress,
) {
    let wait = when
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    progress.note(format!(
        "waiting until {} (in {})",
        humantime::format_rfc3339_seconds(when),
        // Whole seconds, rounded up: "+1s" says 1s, not 0s.
        humantime::format_duration(Duration::from_secs(
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        ))
    ));
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        _ = stop.wait_for(Option::is_some) => {}
    }
}

/// The migration options for `container` to `destination`.
fn one(opts: &DrainOptions, container: &str, destination: &str) -> MigrateOptions {
    let mut migration = opts.migration.clone();
    migration.container_id = container.to_owned();
    migration.destination = destination.to_owned();
    migration
}

/// Every destination's preflight verdict on `container`.
async fn ask(
    opts: &DrainOptions,
    tls: &TlsDir,
    container: &str,
    progress: &DrainProgress,
) -> Candidate {
    let mut candidate = Candidate {
        container: container.to_owned(),
        memory_bytes: 0,
        upper_bytes: 0,
        answers: Vec::new(),
    };
    for destination in &opts.destinations {
        let asked = crate::check::preflight_only(&one(opts, container, destination), tls).await;
        let answer = match asked {
            Ok(verdict) => {
                candidate.memory_bytes = verdict.memory_bytes;
                candidate.upper_bytes = verdict.upper_bytes;
                if verdict.accepted {
                    Answer::Accepted {
                        destination: destination.clone(),
                        mode: verdict.mode.to_owned(),
                        free_bytes: verdict.free_bytes,
                        image_free_bytes: verdict.image_free_bytes,
                        mem_available_bytes: verdict.mem_available_bytes,
                    }
                } else {
                    Answer::Refused {
                        destination: destination.clone(),
                        reasons: verdict.refusals,
                    }
                }
            }
            Err(e) => Answer::Refused {
                destination: destination.clone(),
                reasons: vec![format!("its preflight could not be asked: {e:#}")],
            },
        };
        if let Answer::Refused { reasons, .. } = &answer {
            progress.note(format!(
                "{destination} refuses {container}: {}",
                reasons.join("; ")
            ));
        }
        candidate.answers.push(answer);
    }
    candidate
}

/// A dry run's entry for `placement`.
fn would(placement: &Placement) -> Entry {
    match placement {
        Placement::To {
            container,
            destination,
            mode,
        } => Entry {
            container: container.clone(),
            outcome: Outcome::WouldMove,
            destination: Some(destination.clone()),
            mode: Some(mode.clone()),
            downtime_ms: None,
            reason: None,
            runs_on: "source".to_owned(),
        },
        Placement::Skipped { container, reasons } => {
            Entry::staying(container, Outcome::Skipped, reasons.join("\n"))
        }
    }
}

/// Migrates what `placements` place, `opts.parallel` at once, in order,
/// until the drain is stopped; returns an entry per placement, in order,
/// and why the drain stopped early, if it did.
async fn run(
    opts: &DrainOptions,
    placements: Vec<Placement>,
    stop: &mut watch::Receiver<Option<String>>,
    progress: &DrainProgress,
) -> (Vec<Entry>, Option<String>) {
    let order: Vec<String> = placements
        .iter()
        .map(|p| p.container().to_owned())
        .collect();
    let mut entries: Vec<Entry> = Vec::new();
    let mut queue: VecDeque<(String, String)> = VecDeque::new();
    for placement in placements {
        match placement {
            Placement::To {
                container,
                destination,
                ..
            } => queue.push_back((container, destination)),
            skipped @ Placement::Skipped { .. } => {
                let entry = would(&skipped);
                progress.done(&entry);
                entries.push(entry);
            }
        }
    }
    let mut running = tokio::task::JoinSet::new();
    // A task that panicked says only its id.
    let mut started = std::collections::HashMap::new();
    let mut halted: Option<String> = None;
    loop {
        if halted.is_none() {
            halted = stopped(stop);
        }
        while halted.is_none() && running.len() < opts.parallel {
            let Some((container, destination)) = queue.pop_front() else {
                break;
            };
            progress.note(format!("moving {container} to {destination}"));
            let migration = one(opts, &container, &destination);
            let reporter = progress.migration(&container);
            let task = running.spawn(async move {
                let result = crate::migrate(&migration, &reporter).await;
                reporter.finish();
                result
            });
            started.insert(task.id(), (container, destination));
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            joined = running.join_next_with_id() => {
                let Some(joined) = joined else { continue };
                let id = match &joined {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                let (container, destination) = started.remove(&id).unwrap_or_default();
                let entry = match joined {
                    Ok((_, result)) => settled(container, destination, result),
                    // Where it stopped is unknown: its record says.
                    Err(e) => Entry {
                        container,
                        outcome: Outcome::InDoubt,
                        destination: Some(destination),
                        mode: None,
                        downtime_ms: None,
                        reason: Some(format!("the migration ended abnormally ({e}): see `migrate resolve`")),
                        runs_on: "unknown: see migrate resolve".to_owned(),
                    },
                };
                if opts.stop_on_error && entry.outcome != Outcome::Moved && halted.is_none() {
                    halted = Some(format!("stopped by --stop-on-error: {} {}", entry.container, entry.outcome.word()));
                }
                progress.done(&entry);
                entries.push(entry);
            }
            _ = stop.changed() => {}
        }
    }
    for (container, _) in queue {
        let entry = Entry::staying(&container, Outcome::Skipped, not_started(halted.as_deref()));
        progress.done(&entry);
        entries.push(entry);
    }
    entries.sort_by_key(|e| order.iter().position(|c| c == &e.container));
    (entries, halted)
}

/// The entry of a migration that ended.
fn settled(
    container: String,
    destination: String,
    result: Result<crate::report::Summary, MigrationError>,
) -> Entry {
    match result {
        Ok(summary) => Entry {
            container,
            outcome: Outcome::Moved,
            runs_on: destination.clone(),
            destination: Some(destination),
            mode: Some(summary.mode.used.to_owned()),
            downtime_ms: Some(summary.downtime_ms),
            reason: None,
        },
        Err(failure) => {
            let outcome = match failure.exit_code() {
                crate::EXIT_IN_DOUBT => Outcome::InDoubt,
                crate::EXIT_LOST => Outcome::Lost,
                _ => Outcome::Failed,
            };
            let (said, runs_on) = (failure.outcome().to_owned(), failure.runs_on());
            let error = anyhow::Error::from(failure);
            Entry {
                container,
                outcome,
                destination: Some(destination),
                mode: None,
                downtime_ms: None,
                reason: Some(format!("{error:#} ({said})")),
                runs_on: runs_on.to_owned(),
            }
        }
    }
}

/// `--reboot`: the command runs only if every container moved.
fn reboot(command: &[String], report: &DrainReport, progress: &DrainProgress) -> Reboot {
    let text = command.join(" ");
    if report.exit_code != 0 {
        let t = &report.totals;
        let reason = format!(
            "{} of {} container(s) did not move",
            t.containers - t.moved,
            t.containers
        );
        progress.note(format!("not rebooting: {reason}"));
        return Reboot::NotRebooting { reason };
    }
    let Some((program, args)) = command.split_first() else {
        return Reboot::Failed {
            command: text,
            error: "the reboot command is empty".to_owned(),
        };
    };
    progress.note(format!("every container moved: rebooting (`{text}`)"));
    let ran: Result<String, ToolError> =
        migrate_common::process::run(std::process::Command::new(program).args(args));
    match ran {
        Ok(_) => Reboot::Rebooting { command: text },
        Err(e) => Reboot::Failed {
            command: text,
            error: e.to_string(),
        },
    }
}
