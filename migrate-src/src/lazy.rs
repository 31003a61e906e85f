//! The post-copy dump on the source: `runc checkpoint --lazy-pages`, which
//! writes everything but the container's memory and then serves the memory
//! to the destination's lazy-pages daemon until it has every page.
//!
//! CRIU decides the original's fate by itself at the end of a lazy dump: it
//! kills it when the page transfer ends well and resumes it when the transfer
//! fails, even though by then the destination's copy may have run (measured,
//! see docs/notes-issue5.md). This module keeps that decision ours:
//!
//! - The container is paused before the dump. CRIU records the freezer as
//!   frozen and, whatever it does after a failure, leaves it frozen: the
//!   original never runs again unless we resume it.
//! - CRIU thaws the freezer once it holds the processes; they are frozen
//!   again as soon as the images are complete, so that a CRIU that dies while
//!   serving pages leaves them frozen too, and thawed only just before the
//!   daemon's final close reaches CRIU (CRIU's kill needs them thawed).
//! - CRIU serves pages on an inherited socket (`ps-socket`), not a TCP
//!   listener another local process could connect to. CRIU counts the end of
//!   that socket as success, so it must never end early: runc (and so CRIU)
//!   also inherit a duplicate of the agent's end, and the socket outlives a
//!   killed agent. The transfer is ended on purpose only by the daemon's
//!   close (success) or by [`migrate_common::tunnel::Tunnel::abort`].
//! - CRIU leaves its network lock in place after a failed transfer; going
//!   back removes it ([`LazyDump::go_back`]).

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use migrate_common::criu::{log_tail, ConfigFile, LOG_TAIL_LINES};
use migrate_common::hook::{write_action_script, PostDumpGate, Verdict};
use migrate_common::process::InheritedFds;
use migrate_common::runc::{CheckpointSpec, DumpKind, Runc};
use tokio::process::Child;
use tokio::sync::oneshot;

use crate::checkpoint::{read_output, DumpSetup};

/// Where CRIU finds its page-server socket.
const CRIU_SOCKET_FD: i32 = 100;
/// A duplicate of the agent's end, held by runc and CRIU only so that the
/// socket does not end when the agent does.
const AGENT_END_FD: i32 = 101;

/// A lazy dump that has written its images and serves pages.
#[derive(Debug)]
pub struct LazyDump {
    /// How `runc checkpoint` ended, once it has.
    end: Option<oneshot::Receiver<Result<LazyEnd, String>>>,
    holder_pid: Option<u32>,
    _gate: PostDumpGate,
    image_dir: PathBuf,
    runc: Runc,
    id: String,
    /// The agent's end of CRIU's page-server socket.
    pub socket: Option<tokio::net::UnixStream>,
    /// When the container was paused: the start of its downtime.
    pub frozen_at: Instant,
    /// When CRIU had written every image.
    pub dumped_at: Instant,
}

/// How a lazy dump's `runc checkpoint` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyEnd {
    /// The transfer ended well and CRIU killed the original.
    OriginalGone,
    /// The transfer failed; the original is still there, frozen.
    OriginalFrozen,
}

impl LazyDump {
    /// Pauses the container and starts the lazy dump; returns once its
    /// images are complete and it is ready to serve pages. If anything fails
    /// first, the container is resumed and runs on the source again.
    pub async fn start(
        setup: &DumpSetup<'_>,
        image_dir: &Path,
        parent: Option<&Path>,
    ) -> Result<Self> {
        let DumpSetup {
            runc,
            id,
            work,
            migrate_exe,
            ghost_limit,
            options,
        } = *setup;
        let socket = work.root.join("criu-action.sock");
        let script = work.root.join("criu-action.sh");
        let config = work.root.join("criu-lazy.conf");
        let mut gate = PostDumpGate::bind(&socket)?;
        // The fate of the original is decided by the page transfer, not at
        // post-dump, which CRIU runs before serving the first page.
        gate.decide(Verdict::Finish);
        write_action_script(&script, migrate_exe, &socket)?;
        ConfigFile {
            action_script: Some(script),
            ghost_limit: Some(ghost_limit),
            ps_socket: Some(CRIU_SOCKET_FD),
            cgroup_root: None,
        }
        .write(&config)?;
        let (criu_end, agent_end) =
            StdUnixStream::pair().context("creating the page-server socket pair")?;
        let mut fds = InheritedFds::default();
        fds.add(criu_end.into(), CRIU_SOCKET_FD);
        fds.add(
            agent_end
                .try_clone()
                .context("duplicating the agent's end of the page-server socket")?
                .into(),
            AGENT_END_FD,
        );

        runc.pause(id)
            .with_context(|| format!("pausing {id} for the lazy dump"))?;
        let frozen_at = Instant::now();
        let mut cmd = runc.checkpoint_command(&CheckpointSpec {
            id,
            kind: DumpKind::Lazy,
            image_dir,
            work_dir: image_dir,
            parent,
            criu_config: &config,
            options,
        });
        fds.apply(&mut cmd);
        let spawned = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("starting {}", runc.binary.display()));
        drop(fds);
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                resume_quietly(runc, id);
                return Err(e);
            }
        };

        let mut dumped_at = None;
        loop {
            tokio::select! {
                event = gate.next_event() => {
                    let Some(event) = event else { bail!("the CRIU action gate closed unexpectedly") };
                    match event.action.as_str() {
                        "post-dump" => dumped_at = Some(event.at),
                        "status-ready" => break,
                        _ => {}
                    }
                }
                status = child.wait() => {
                    let status = status.context("waiting for runc checkpoint")?;
                    let output = read_output(&mut child).await;
                    // CRIU put the processes back as it found them: paused.
                    resume_quietly(runc, id);
                    bail!(
                        "source: the lazy dump of {id} failed before its images were complete ({status}); \
                         the container keeps running on the source\nrunc: {}\nCRIU {}",
                        output.trim(),
                        log_tail(&image_dir.join("dump.log"), LOG_TAIL_LINES)
                    );
                }
            }
        }
        // CRIU thawed the freezer after seizing the processes: freeze them
        // again, so that they stay frozen even if CRIU dies while serving.
        // Without it the migration still works; only that protection is lost.
        if let Err(e) = runc.pause(id) {
            tracing::warn!(error = %e, "freezing {id} again while its pages are served");
        }
        agent_end
            .set_nonblocking(true)
            .context("preparing the page-server socket")?;
        let socket = tokio::net::UnixStream::from_std(agent_end)
            .context("preparing the page-server socket")?;
        let holder_pid = child.id();
        let (ended, end) = oneshot::channel();
        let log = image_dir.join("dump.log");
        tokio::spawn(async move {
            let _ = ended.send(wait_for_end(child, &log).await);
        });
        Ok(Self {
            dumped_at: dumped_at.unwrap_or_else(Instant::now),
            frozen_at,
            end: Some(end),
            holder_pid,
            _gate: gate,
            image_dir: image_dir.to_owned(),
            runc: runc.clone(),
            id: id.to_owned(),
            socket: Some(socket),
        })
    }

    pub fn image_dir(&self) -> &Path {
        &self.image_dir
    }

    /// Thaws the original just before the daemon's final close goes to
    /// CRIU, which then kills it: CRIU's kill of a frozen process waits
    /// forever. The processes stay stopped under CRIU meanwhile.
    pub fn thaw_for_the_end(&self) -> Result<()> {
        self.runc
            .resume(&self.id)
            .with_context(|| format!("thawing {} for CRIU to end it", self.id))
    }

    /// Waits for `runc checkpoint` to end. Cancel-safe; once it has
    /// answered, later calls wait forever.
    pub async fn ended(&mut self) -> Result<LazyEnd> {
        let Some(end) = self.end.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = end.await;
        self.end = None;
        outcome
            .map_err(|_| anyhow!("lost track of runc checkpoint"))?
            .map_err(|e| anyhow!(e))
    }

    /// After CRIU ended a failed transfer (the original frozen): removes the
    /// network lock CRIU left and resumes the original.
    pub fn go_back(&self) -> Result<()> {
        let state = self.runc.state(&self.id)?;
        migrate_common::netns::remove_criu_network_lock(state.pid)
            .context("removing CRIU's network lock from the original")?;
        self.runc
            .resume(&self.id)
            .with_context(|| format!("resuming {}", self.id))
    }

    /// The pid of the `runc checkpoint` process, which holds the original.
    pub fn holder_pid(&self) -> Option<u32> {
        self.holder_pid
    }
}

async fn wait_for_end(mut child: Child, log: &Path) -> Result<LazyEnd, String> {
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for runc checkpoint: {e}"))?;
    if status.success() {
        return Ok(LazyEnd::OriginalGone);
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if text.contains("Lazy pages transfer FAILED") {
        return Ok(LazyEnd::OriginalFrozen);
    }
    let output = read_output(&mut child).await;
    Err(format!(
        "source: `runc checkpoint --lazy-pages` ended unexpectedly ({status})\nrunc: {}\nCRIU {}",
        output.trim(),
        log_tail(log, LOG_TAIL_LINES)
    ))
}

/// Best effort: the container was paused by us and must not stay so.
fn resume_quietly(runc: &Runc, id: &str) {
    if let Err(e) = runc.resume(id) {
        tracing::warn!(error = %e, "resuming {id} after a failed lazy dump");
    }
}
