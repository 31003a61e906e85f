//! `migrate resolve <id>`: settles, from the source's record, a migration
//! that stopped before both sides settled (in doubt, interrupted, or its
//! `migrate` killed).
//!
//! | record                    | destination holds        | resolve does                                   |
//! |---------------------------|--------------------------|------------------------------------------------|
//! | none                      | anything                 | reports both sides; the operator chooses        |
//! | started / aborted         | a held copy, or nothing  | discards it; the source copy runs (resumed)    |
//! | decided, eager            | held or released copy    | releases it and commits; the source copy is gone |
//! | decided, lazy             | its copy, pages missing  | `--go-back` only: discards it, resumes the original |
//!
//! A lazy migration whose `migrate` died after the decision cannot have its
//! page transfer resumed: the relay's unsent bytes died with it. Its
//! original still has every page, so going back (losing what the
//! destination's copy did since the freeze) is the one way out, and only
//! an operator may take it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use migrate_common::certs::TlsDir;
use migrate_common::process::wait_for_exit;
use migrate_common::protocol::{Abort, Body, Commit, Release, Resume, Resumed, PROTOCOL_VERSION};
use migrate_common::record::{SourcePhase, SourceRecord};
use migrate_common::runc::Runc;
use serde::Serialize;

use crate::journal::Journal;
use crate::link::{self, Dial, Link, Refused};
use crate::progress::Reporter;
use crate::MigrateOptions;

/// How long the process that held the source copy may take to end.
const HOLDER_END: Duration = Duration::from_secs(30);
/// How long the destination may take to answer a step.
const ANSWER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ResolveOptions {
    pub container_id: String,
    /// Overrides the destination in the record (or names one without it).
    pub destination: Option<String>,
    /// Post-copy after the decision: discard the destination's copy and
    /// resume the original.
    pub go_back: bool,
    pub tls_dir: PathBuf,
    pub state_dir: PathBuf,
    pub runc: Runc,
    pub link_timeout: Duration,
}

/// Where the container runs after `resolve`, and what it did.
#[derive(Debug, Serialize)]
pub struct Resolution {
    pub container: String,
    pub runs_on: &'static str,
    pub actions: Vec<String>,
    /// The same codes as `migrate`: 0 destination, 1 source, 3 still in
    /// doubt, 4 lost.
    pub exit_code: u8,
}

pub async fn resolve(opts: &ResolveOptions, reporter: &Reporter) -> Result<Resolution> {
    let id = &opts.container_id;
    let (journal, record) = Journal::lock_any(&opts.state_dir, id)?;
    let tls = TlsDir::load(&opts.tls_dir).context("loading TLS material")?;
    let Some(record) = record.filter(|r| r.phase != SourcePhase::Done) else {
        return report_without_record(opts, &tls).await;
    };
    let destination = opts
        .destination
        .clone()
        .unwrap_or_else(|| record.destination.clone());
    let dial = Dial {
        destination: &destination,
        tls: &tls,
        idle_timeout: opts.link_timeout,
    };
    let lazy = matches!(record.mode.as_str(), "post-copy" | "hybrid");
    let mut actions = Vec::new();
    match record.phase {
        SourcePhase::Decided if lazy && !opts.go_back => Ok(Resolution {
            container: id.clone(),
            runs_on: "held, in doubt: see migrate resolve",
            actions: vec![format!(
                "the decision for {destination} was taken in post-copy and the `migrate` that relayed \
                 the pages is gone: the page transfer cannot resume. The original on this host still \
                 has every page. `migrate resolve {id} --go-back` discards the destination's copy \
                 (losing what it did since the freeze) and resumes the original"
            )],
            exit_code: crate::EXIT_IN_DOUBT,
        }),
        SourcePhase::Decided if !lazy => {
            reporter.phase(format!("releasing {id} on {destination}"));
            match release(&dial, &record).await {
                Ok(done) => actions.push(done),
                Err(e) if e.downcast_ref::<Refused>().is_some() => {
                    return Ok(Resolution {
                        container: id.clone(),
                        runs_on: "nowhere",
                        actions: vec![format!(
                            "LOST: the decision was taken and the source copy ended, but {destination} \
                             holds no copy: {e:#}"
                        )],
                        exit_code: crate::EXIT_LOST,
                    })
                }
                Err(e) => return Err(e.context(format!("releasing the copy on {destination}"))),
            }
            end_source_copy(&opts.runc, &record, &mut actions).await?;
            remove_work_dir(&record, &mut actions);
            journal.remove()?;
            Ok(Resolution {
                container: id.clone(),
                runs_on: "destination",
                actions,
                exit_code: 0,
            })
        }
        _ => {
            // Undecided, or a post-copy decision the operator reverses.
            reporter.phase(format!("discarding the copy of {id} on {destination}"));
            actions.push(discard(&dial, &record).await?);
            actions.push(resume_source(&opts.runc, &record, lazy).await?);
            if record.phase == SourcePhase::Decided {
                actions.push(
                    "went back to the original: what the destination's copy did since the freeze is lost"
                        .into(),
                );
            }
            remove_work_dir(&record, &mut actions);
            journal.remove()?;
            Ok(Resolution {
                container: id.clone(),
                runs_on: "source",
                actions,
                exit_code: 1,
            })
        }
    }
}

/// Before a new migration of the same container: an earlier one stopped
/// before its decision; its destination discards whatever it holds, and
/// the source copy must run.
pub(crate) async fn discard_undecided(
    record: &SourceRecord,
    tls: &TlsDir,
    opts: &MigrateOptions,
    reporter: &Reporter,
) -> Result<()> {
    let dial = Dial {
        destination: &record.destination,
        tls,
        idle_timeout: opts.link_timeout,
    };
    let lazy = matches!(record.mode.as_str(), "post-copy" | "hybrid");
    reporter.note(discard(&dial, record).await?);
    reporter.note(resume_source(&opts.runc, record, lazy).await?);
    let mut removed = Vec::new();
    remove_work_dir(record, &mut removed);
    for note in removed {
        reporter.note(note);
    }
    Ok(())
}

/// The settled migration's images and CRIU logs go (no CRIU uses them
/// once its holder has ended).
fn remove_work_dir(record: &SourceRecord, actions: &mut Vec<String>) {
    let Some(dir) = &record.work_dir else { return };
    match std::fs::remove_dir_all(dir) {
        Ok(()) => actions.push(format!("removed its work dir {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => actions.push(format!(
            "could not remove its work dir {}: {e}",
            dir.display()
        )),
    }
}

/// The destination drops what it holds of the migration.
async fn discard(dial: &Dial<'_>, record: &SourceRecord) -> Result<String> {
    let Some((mut link, _)) = held(dial, record).await? else {
        return Ok(format!(
            "{} holds nothing of migration {}",
            dial.destination, record.migration_id
        ));
    };
    link.control
        .send(Abort {
            reason: "migrate resolve: no decision was taken (or it was reversed)".into(),
        })
        .await?;
    expect(&mut link, "Discarded", |b| matches!(b, Body::Discarded(_))).await?;
    link.close().await;
    Ok(format!(
        "{} discarded its copy of {}",
        dial.destination, record.container_id
    ))
}

/// The destination lets its held copy run, and commits.
async fn release(dial: &Dial<'_>, record: &SourceRecord) -> Result<String> {
    let (mut link, status) = held(dial, record)
        .await?
        .ok_or_else(|| Refused("no migration of that id is held there".into()))?;
    let mut done = Vec::new();
    if status.released.is_none() {
        if status.restored.is_none() {
            return Err(Refused("it holds no restored copy".into()).into());
        }
        link.control.send(Release {}).await?;
        expect(&mut link, "Released", |b| matches!(b, Body::Released(_))).await?;
        done.push("released its held copy");
    }
    link.control.send(Commit {}).await?;
    expect(&mut link, "Committed", |b| matches!(b, Body::Committed(_))).await?;
    done.push("committed");
    link.close().await;
    Ok(format!("{}: {}", dial.destination, done.join(", ")))
}

/// What the destination holds of the record's migration; `None` if it says
/// it holds nothing.
async fn held(dial: &Dial<'_>, record: &SourceRecord) -> Result<Option<(Link, Resumed)>> {
    let asked = link::ask(
        dial,
        Resume {
            protocol_version: PROTOCOL_VERSION,
            migration_id: record.migration_id.clone(),
            tunnel_delivered: 0,
            container_id: record.container_id.clone(),
        },
    )
    .await;
    match asked {
        Ok(held) => Ok(Some(held)),
        Err(e) if e.downcast_ref::<Refused>().is_some() => Ok(None),
        Err(e) => Err(e.context(format!("asking {} what it holds", dial.destination))),
    }
}

async fn expect(link: &mut Link, what: &str, is: impl Fn(&Body) -> bool) -> Result<()> {
    let msg = tokio::time::timeout(ANSWER, link.control.recv())
        .await
        .map_err(|_| anyhow!("no {what} within {ANSWER:?}"))??;
    match msg.body {
        Some(body) if is(&body) => Ok(()),
        Some(Body::Failed(failed)) => bail!(
            "the destination failed at {}: {}{}",
            failed.stage,
            failed.message,
            crate::conclude::tail_section(&failed.criu_log_tail)
        ),
        other => bail!(
            "the destination answered {} where {what} was due",
            migrate_common::protocol::ControlMessage { body: other }.kind()
        ),
    }
}

/// After a release: the process that held the source copy has ended it
/// (its hook read the decision), and runc's record goes.
async fn end_source_copy(
    runc: &Runc,
    record: &SourceRecord,
    actions: &mut Vec<String>,
) -> Result<()> {
    wait_holder(record).await?;
    crate::finish::remove_runc_record(runc, &record.container_id)?;
    actions.push(format!(
        "the source copy of {} is gone",
        record.container_id
    ));
    Ok(())
}

/// Makes sure the source copy runs again: an eager dump's holder resumed it
/// when its hook read the record; a lazy dump's CRIU serves pages until it
/// is ended, then the original is let go of and thawed.
async fn resume_source(runc: &Runc, record: &SourceRecord, lazy: bool) -> Result<String> {
    let id = &record.container_id;
    if lazy {
        if let Some(pid) = record.holder_pid.and_then(|p| i32::try_from(p).ok()) {
            end_process_tree(pid);
        }
    }
    wait_holder(record).await?;
    let state = runc
        .state(id)
        .with_context(|| format!("finding {id} on the source"))?;
    migrate_common::netns::remove_criu_network_lock(state.pid)
        .context("removing CRIU's network lock")?;
    if state.status == "paused" {
        runc.resume(id)
            .with_context(|| format!("resuming {id} on the source"))?;
    }
    let state = runc.state(id)?;
    if !state.is_running() {
        bail!("{id} is {} on the source", state.status);
    }
    Ok(format!("{id} runs on the source (pid {})", state.pid))
}

async fn wait_holder(record: &SourceRecord) -> Result<()> {
    let Some(pid) = record.holder_pid.and_then(|p| i32::try_from(p).ok()) else {
        return Ok(());
    };
    if !wait_for_exit(pid, HOLDER_END).await? {
        bail!("`runc checkpoint` (pid {pid}), which holds the source copy, has not ended after {HOLDER_END:?}");
    }
    Ok(())
}

/// SIGKILLs `pid` and its descendants, children first: the lazy dump's
/// runc and the CRIU under it, whose tracing of the frozen original ends
/// with them (the cgroup freezer keeps it frozen until it is thawed).
fn end_process_tree(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    for child in children(pid) {
        end_process_tree(child);
    }
    let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
}

fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// No record: what each side holds, and what the operator must choose.
async fn report_without_record(opts: &ResolveOptions, tls: &TlsDir) -> Result<Resolution> {
    let id = &opts.container_id;
    let mut actions = vec![format!("no record of a migration of {id} on this host")];
    let here = match opts.runc.state(id) {
        Ok(state) => {
            actions.push(format!(
                "source: {id} is {} (pid {})",
                state.status, state.pid
            ));
            state.is_running()
        }
        Err(_) => {
            actions.push(format!("source: runc knows no container {id}"));
            false
        }
    };
    let mut there = None;
    if let Some(destination) = &opts.destination {
        let dial = Dial {
            destination,
            tls,
            idle_timeout: opts.link_timeout,
        };
        let asked = link::ask(
            &dial,
            Resume {
                protocol_version: PROTOCOL_VERSION,
                migration_id: String::new(),
                tunnel_delivered: 0,
                container_id: id.clone(),
            },
        )
        .await;
        match asked {
            Ok((link, status)) => {
                let what = if status.released.is_some() {
                    "a released copy, running"
                } else if status.restored.is_some() {
                    "a restored copy, held (not running)"
                } else {
                    "a migration of it under way, nothing restored"
                };
                actions.push(format!("destination {destination}: {what}"));
                there = Some(status.released.is_some());
                link.abandon();
            }
            Err(e) if e.downcast_ref::<Refused>().is_some() => {
                actions.push(format!("destination {destination}: holds nothing of {id}"))
            }
            Err(e) => actions.push(format!("destination {destination}: cannot tell ({e:#})")),
        }
    } else {
        actions.push("pass --to HOST:PORT to ask the destination what it holds".into());
    }
    let (runs_on, exit_code) = match (here, there) {
        (true, None) => ("source", 1),
        (false, Some(true)) => ("destination", 0),
        _ => {
            actions.push(
                "without a record nothing is settled automatically: keep the copy that should run, \
                 and discard the other (on the destination, `migrate-dst` discards a held copy only \
                 when its source says so)"
                    .into(),
            );
            ("held, in doubt: see migrate resolve", crate::EXIT_IN_DOUBT)
        }
    };
    Ok(Resolution {
        container: id.clone(),
        runs_on,
        actions,
        exit_code,
    })
}
