//! The post-copy dump on the source: `runc checkpoint --lazy-pages`, which
//! writes everything but the container's memory and then serves the memory
//! to the destination's lazy-pages daemon until it has every page.
//!
//! CRIU decides the original's fate by itself at the end of a lazy dump: it
//! kills it when the page transfer ends well and resumes it when the transfer
//! fails, even though by then the destination's copy may have run (measured,
//! see docs/notes-issue5.md). This module keeps that decision ours:
//!
//! - CRIU freezes the container, holds its processes and thaws the freezer.
//!   As soon as the images are complete (CRIU's `status-ready`, before any
//!   page is served and before the destination can have anything to
//!   restore) the container's cgroup is frozen again, and the destination is
//!   not told to restore until it is ([`LazyDump::fenced`]). After a failed
//!   transfer CRIU lets go of the processes but does not thaw them (it only
//!   restores the freezer state it found, thawed, by not touching it), and a
//!   CRIU that dies while serving leaves them frozen too: the original never
//!   runs again unless we resume it. They are thawed only just before the
//!   daemon's final close reaches CRIU, whose kill needs them thawed.
//!   A dump that fails before `status-ready` is resumed by CRIU at once,
//!   which is right: nothing was sent.
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

use anyhow::{bail, Context, Result};
use migrate_common::criu::{log_tail, LOG_TAIL_LINES};
use migrate_common::hook::{Gate, Verdict};
use migrate_common::process::InheritedFds;
use migrate_common::runc::{CheckpointSpec, DumpKind, Runc};
use tokio::process::Child;
use tokio::sync::oneshot;

use crate::checkpoint::{read_output, settle, DumpSetup};

/// Where CRIU finds its page-server socket.
const CRIU_SOCKET_FD: i32 = 100;
/// A duplicate of the agent's end, held by runc and CRIU only so that the
/// socket does not end when the agent does.
const AGENT_END_FD: i32 = 101;

/// A lazy dump under way: writing its images, then serving pages.
#[derive(Debug)]
pub struct LazyDump {
    /// How `runc checkpoint` will end, and how it did.
    end: Option<oneshot::Receiver<Result<LazyEnd, String>>>,
    outcome: Option<Result<LazyEnd, String>>,
    holder_pid: Option<u32>,
    gate: Gate,
    image_dir: PathBuf,
    runc: Runc,
    id: String,
    /// The agent's end of CRIU's page-server socket.
    pub socket: Option<tokio::net::UnixStream>,
    spawned_at: Instant,
    /// When CRIU began freezing the container: the start of its downtime.
    pub frozen_at: Instant,
    /// When CRIU had written every image.
    pub dumped_at: Instant,
    /// Freezing the cgroup again once the images are complete.
    fence: Option<tokio::task::JoinHandle<Result<()>>>,
}

/// How a lazy dump's `runc checkpoint` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyEnd {
    /// The transfer ended well and CRIU killed the original.
    OriginalGone,
    /// The dump or the transfer failed; the original is still there, frozen
    /// or (when the dump failed before the fence) resumed by CRIU.
    OriginalKept,
}

impl LazyDump {
    /// Starts `runc checkpoint --lazy-pages`. The handle exists from the
    /// start, so that whatever interrupts the migration from here on finds
    /// the dump to end ([`crate::finish`] writes CRIU an abort request; CRIU
    /// reads it as soon as it would serve pages).
    pub fn spawn(setup: &DumpSetup<'_>, image_dir: &Path, parent: Option<&Path>) -> Result<Self> {
        let DumpSetup {
            runc, id, options, ..
        } = *setup;
        let (gate, config) = setup.gate_and_config("criu-lazy.conf", Some(CRIU_SOCKET_FD))?;
        // The fate of the original is decided by the page transfer, not at
        // post-dump, which CRIU runs before serving the first page.
        gate.decide(Verdict::Proceed);
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
        agent_end
            .set_nonblocking(true)
            .context("preparing the page-server socket")?;
        let socket = tokio::net::UnixStream::from_std(agent_end)
            .context("preparing the page-server socket")?;

        let spawned_at = Instant::now();
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
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("starting {}", runc.binary.display()))?;
        drop(fds);
        let holder_pid = child.id();
        let (ended, end) = oneshot::channel();
        let log = image_dir.join("dump.log");
        tokio::spawn(async move {
            let _ = ended.send(wait_for_end(child, &log).await);
        });
        Ok(Self {
            end: Some(end),
            outcome: None,
            holder_pid,
            gate,
            image_dir: image_dir.to_owned(),
            runc: runc.clone(),
            id: id.to_owned(),
            socket: Some(socket),
            spawned_at,
            frozen_at: spawned_at,
            dumped_at: spawned_at,
            fence: None,
        })
    }

    /// Waits until CRIU has written every image and is ready to serve
    /// pages, then starts freezing the cgroup again. If the dump fails
    /// first, CRIU has resumed the container and it runs on the source.
    pub async fn images_ready(&mut self) -> Result<()> {
        let (mut frozen_at, mut dumped_at) = (None, None);
        loop {
            let event = tokio::select! {
                event = self.gate.next_event() => event,
                end = settle(&mut self.end, &mut self.outcome) => {
                    let reason = match end {
                        Ok(_) => "it ended".to_owned(),
                        Err(e) => format!("{e:#}"),
                    };
                    bail!(
                        "source: the lazy dump of {} failed before its images were complete: {reason}; \
                         the container keeps running on the source\nCRIU {}",
                        self.id,
                        log_tail(&self.image_dir.join("dump.log"), LOG_TAIL_LINES)
                    );
                }
            };
            let Some(event) = event else {
                bail!("the CRIU action gate closed unexpectedly")
            };
            match event.action.as_str() {
                "pre-dump" => frozen_at = Some(event.at),
                "post-dump" => dumped_at = Some(event.at),
                "status-ready" => break,
                _ => {}
            }
        }
        self.frozen_at = frozen_at.unwrap_or(self.spawned_at);
        self.dumped_at = dumped_at.unwrap_or_else(Instant::now);
        // While the images cross; awaited before the destination may restore.
        self.fence = Some({
            let (runc, id) = (self.runc.clone(), self.id.clone());
            tokio::task::spawn_blocking(move || {
                runc.pause(&id)
                    .with_context(|| format!("freezing {id} while its pages are served"))
            })
        });
        Ok(())
    }

    pub fn image_dir(&self) -> &Path {
        &self.image_dir
    }

    /// Waits until the original is frozen by its cgroup, independently of
    /// CRIU: the destination must not restore before.
    pub async fn fenced(&mut self) -> Result<()> {
        match self.fence.take() {
            Some(fence) => fence.await.context("freezing the original")?,
            None => Ok(()),
        }
    }

    fn paused(&self) -> bool {
        self.runc
            .state(&self.id)
            .is_ok_and(|state| state.status == "paused")
    }

    /// Thaws the original just before the daemon's final close goes to
    /// CRIU, which then kills it: CRIU's kill of a frozen process waits
    /// forever. The processes stay stopped under CRIU meanwhile.
    pub fn thaw_for_the_end(&self) -> Result<()> {
        if !self.paused() {
            return Ok(());
        }
        self.runc
            .resume(&self.id)
            .with_context(|| format!("thawing {} for CRIU to end it", self.id))
    }

    /// Waits for `runc checkpoint` to end; once it has, returns how at
    /// once. Cancel-safe.
    pub async fn ended(&mut self) -> Result<LazyEnd> {
        settle(&mut self.end, &mut self.outcome).await
    }

    /// After CRIU ended a failed dump or transfer: removes the network lock
    /// CRIU may have left and resumes the original if it is frozen.
    pub fn go_back(&self) -> Result<()> {
        let state = self.runc.state(&self.id)?;
        migrate_common::netns::remove_criu_network_lock(state.pid)
            .context("removing CRIU's network lock from the original")?;
        if !self.paused() {
            return Ok(());
        }
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
    // CRIU's own words for a dump it gave up on: the processes are then
    // let go of, not killed.
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if text.contains("Lazy pages transfer FAILED") || text.contains("Dumping FAILED") {
        return Ok(LazyEnd::OriginalKept);
    }
    let output = read_output(&mut child).await;
    Err(format!(
        "source: `runc checkpoint --lazy-pages` ended unexpectedly ({status})\nrunc: {}\nCRIU {}",
        output.trim(),
        log_tail(log, LOG_TAIL_LINES)
    ))
}
