//! The final dump of stop-and-copy and pre-copy: `runc checkpoint` while
//! keeping the container frozen, not killed, until the destination has
//! answered; and the migration's working dir.
//!
//! The images go to a working dir on tmpfs. The container's fate is held by
//! the post-dump gate ([`migrate_common::hook`]): [`Checkpoint::decide`]
//! with `Proceed` lets CRIU kill the frozen processes, with `Undo` makes it
//! resume them; if this process dies first, the hook decides from the
//! migration's record.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use migrate_common::criu::{log_tail, ConfigFile, LOG_TAIL_LINES};
use migrate_common::hook::{
    action_script, write_action_script, Gate, Verdict, POST_DUMP, SOURCE_ACTIONS,
};
use migrate_common::runc::{CheckpointSpec, CriuOptions, DumpKind, Runc};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// A migration's private working directory on the source.
#[derive(Debug, Clone)]
pub struct WorkDir {
    pub root: PathBuf,
}

impl WorkDir {
    /// Creates `<base>/<id>-<pid>` (0700), after removing the dirs of
    /// migrations whose process is gone (killed: its container was resumed
    /// by CRIU, but nobody removed the images).
    pub fn create(base: &Path, id: &str) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(base)
            .with_context(|| format!("creating work dir base {}", base.display()))?;
        remove_orphans(base);
        let root = base.join(format!("{id}-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .with_context(|| format!("creating work dir {}", root.display()))?;
        Ok(Self { root })
    }

    /// Where every dump's image dir lives: `images/<round>` for pre-dump
    /// rounds and `images/final` for the final dump, so that each can name
    /// its parent as `../<round>`.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The image dir of pre-dump round `round` (from 1).
    pub fn round_dir(&self, round: u32) -> PathBuf {
        self.images().join(round.to_string())
    }

    pub fn final_dir(&self) -> PathBuf {
        self.images().join("final")
    }

    pub fn remove(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.root)
            .with_context(|| format!("removing {}", self.root.display()))
    }
}

fn remove_orphans(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if !process_alive(pid) {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove an orphaned work dir");
            }
        }
    }
}

/// The pid in a work dir's name `<container-id>-<pid>`.
pub fn owner_pid(dir_name: &str) -> Option<i32> {
    let (_, pid) = dir_name.rsplit_once('-')?;
    pid.parse().ok().filter(|p| *p > 0)
}

fn process_alive(pid: i32) -> bool {
    // Signal 0 checks existence; EPERM would mean it exists under another user.
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::Error::ESRCH)
    )
}

/// What every dump of one migration shares.
#[derive(Debug, Clone, Copy)]
pub struct DumpSetup<'a> {
    pub runc: &'a Runc,
    pub id: &'a str,
    pub work: &'a WorkDir,
    /// This program, for CRIU's action script to call back.
    pub migrate_exe: &'a Path,
    /// The migration's durable record: the hook reads it when the agent is
    /// gone.
    pub record: &'a Path,
    pub ghost_limit: u64,
    pub options: CriuOptions,
}

impl DumpSetup<'_> {
    /// The gate on CRIU's action script for the final dump (eager or lazy)
    /// and the CRIU config file that names the script; `ps_socket` for a
    /// lazy dump. Pre-dumps have no script: nothing waits on them.
    pub fn gate_and_config(
        &self,
        config_name: &str,
        ps_socket: Option<i32>,
    ) -> Result<(Gate, PathBuf)> {
        let socket = self.work.root.join("criu-action.sock");
        let script = self.work.root.join("criu-action.sh");
        let config = self.work.root.join(config_name);
        let gate = Gate::bind(&socket, POST_DUMP)?;
        write_action_script(
            &script,
            &action_script(self.migrate_exe, &socket, SOURCE_ACTIONS, &[self.record]),
        )?;
        let mut file = ConfigFile {
            action_script: Some(script),
            ghost_limit: Some(self.ghost_limit),
            ps_socket,
            ..ConfigFile::default()
        };
        self.options.apply_to_dump(&mut file);
        file.write(&config)?;
        Ok((gate, config))
    }
}

/// The final dump of an eager mode: `runc checkpoint`, which dumps the
/// container and then waits in post-dump, frozen, for a verdict.
#[derive(Debug)]
pub struct Checkpoint {
    gate: Gate,
    end: Option<oneshot::Receiver<Result<Outcome, String>>>,
    outcome: Option<Result<Outcome, String>>,
    holder_pid: Option<u32>,
    image_dir: PathBuf,
    id: String,
    spawned_at: Instant,
    /// When CRIU started freezing the container (its pre-dump action).
    pub frozen_at: Instant,
    /// When the images were complete (its post-dump action).
    pub dumped_at: Instant,
}

/// How the checkpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// runc checkpoint exited 0: the source copy is gone.
    Finished,
    /// CRIU resumed the container on the source (or never froze it).
    Resumed,
}

impl Checkpoint {
    /// Starts `runc checkpoint`. The handle exists from the start, so that
    /// whatever interrupts the migration from here on can decide.
    pub fn spawn(setup: &DumpSetup<'_>, image_dir: &Path, parent: Option<&Path>) -> Result<Self> {
        let DumpSetup {
            runc, id, options, ..
        } = *setup;
        let (gate, config) = setup.gate_and_config("criu.conf", None)?;
        let std_cmd = runc.checkpoint_command(&CheckpointSpec {
            id,
            kind: DumpKind::Final,
            image_dir,
            work_dir: image_dir,
            parent,
            criu_config: &config,
            options,
        });
        let spawned_at = Instant::now();
        let child = Command::from(std_cmd)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("starting {}", runc.binary.display()))?;
        let holder_pid = child.id();
        let (ended, end) = oneshot::channel();
        let log = image_dir.join("dump.log");
        tokio::spawn(async move {
            let _ = ended.send(wait_for_end(child, &log).await);
        });
        Ok(Self {
            gate,
            end: Some(end),
            outcome: None,
            holder_pid,
            image_dir: image_dir.to_owned(),
            id: id.to_owned(),
            spawned_at,
            frozen_at: spawned_at,
            dumped_at: spawned_at,
        })
    }

    /// Waits until CRIU has written every image and holds the container,
    /// frozen, in post-dump. If CRIU fails first, the container is still
    /// running and the error carries the tail of CRIU's dump log.
    pub async fn images_ready(&mut self) -> Result<()> {
        let mut frozen_at = None;
        loop {
            let event = tokio::select! {
                event = self.gate.next_event() => event,
                end = settle(&mut self.end, &mut self.outcome) => {
                    let reason = match end {
                        Ok(_) => "it ended".to_owned(),
                        Err(e) => format!("{e:#}"),
                    };
                    bail!(
                        "source: `runc checkpoint {}` failed before the images were complete: {reason}; \
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
                "post-dump" => {
                    self.frozen_at = frozen_at.unwrap_or(self.spawned_at);
                    self.dumped_at = event.at;
                    return Ok(());
                }
                _ => {}
            }
        }
    }

    /// Tells CRIU what to do with the frozen container: end it (the
    /// destination's copy was chosen) or resume it.
    pub fn decide(&self, verdict: Verdict) {
        self.gate.decide(verdict);
    }

    /// Waits for `runc checkpoint` to end; once it has, returns how at
    /// once. Cancel-safe.
    pub async fn ended(&mut self) -> Result<Outcome> {
        settle(&mut self.end, &mut self.outcome).await
    }

    /// The `runc checkpoint` process, which holds the frozen container.
    pub fn holder_pid(&self) -> Option<u32> {
        self.holder_pid
    }
}

/// How a child's end was, waiting for it the first time: the answer
/// behind both dumps' `ended`.
pub(crate) async fn settle<T: Copy>(
    end: &mut Option<oneshot::Receiver<Result<T, String>>>,
    outcome: &mut Option<Result<T, String>>,
) -> Result<T> {
    if outcome.is_none() {
        let got = match end.as_mut() {
            Some(receiver) => receiver
                .await
                .unwrap_or_else(|_| Err("lost track of runc checkpoint".to_owned())),
            None => Err("lost track of runc checkpoint".to_owned()),
        };
        *end = None;
        *outcome = Some(got);
    }
    match outcome {
        Some(Ok(value)) => Ok(*value),
        Some(Err(e)) => Err(anyhow!("{e}")),
        None => Err(anyhow!("lost track of runc checkpoint")),
    }
}

async fn wait_for_end(mut child: Child, log: &Path) -> Result<Outcome, String> {
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for runc checkpoint: {e}"))?;
    if status.success() {
        return Ok(Outcome::Finished);
    }
    // CRIU's words when the post-dump script told it to stop or the dump
    // failed: the processes were let go of, not killed.
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if text.contains("Post dump script passed with")
        || text.contains("Unfreezing tasks")
        || text.contains("Dumping FAILED")
    {
        return Ok(Outcome::Resumed);
    }
    let output = read_output(&mut child).await;
    Err(format!(
        "source: `runc checkpoint` ended unexpectedly ({status})\nrunc: {}\nCRIU {}",
        output.trim(),
        log_tail(log, LOG_TAIL_LINES)
    ))
}

pub(crate) async fn read_output(child: &mut Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut text).await;
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut text).await;
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn orphaned_work_dirs_are_removed_and_live_ones_kept() {
        assert_eq!(owner_pid("web-1-4242"), Some(4242));
        assert_eq!(owner_pid("web"), None);
        let base = tempfile::tempdir().unwrap();
        // A pid far above pid_max cannot be alive.
        let dead = base.path().join("c1-99999999");
        let live = base.path().join(format!("c2-{}", std::process::id()));
        let other = base.path().join("not-a-work-dir");
        for d in [&dead, &live, &other] {
            std::fs::create_dir(d).unwrap();
        }
        let work = WorkDir::create(base.path(), "c3").unwrap();
        assert!(!dead.exists());
        assert!(live.exists() && other.exists() && work.root.exists());
    }
}
