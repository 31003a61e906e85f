//! Phase 7 on the destination: rebuild the rootfs, write the bundle, and
//! `runc restore` the container, held until the source decides; or, on
//! failure, remove every trace of it.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use migrate_common::criu::{log_tail, LOG_TAIL_LINES};
use migrate_common::hook::{Gate, Verdict, POST_RESTORE};
use migrate_common::mount::{mount_overlay, unmount_all_under};
use migrate_common::protocol::{Failed, Hello, Restored};
use migrate_common::rootfs::digest::LayerDigest;
use migrate_common::runc::{RestoreSpec, Runc};
use tokio::sync::oneshot;

use crate::images::ImageDir;
use crate::network;
use crate::prepare::Prepared;
use crate::receive::{dump_dir, link_parent};
use crate::Daemon;

/// How the images are to be restored.
#[derive(Debug, Clone, Copy)]
pub struct RestorePlan {
    /// The pre-dump round the final dump builds on; 0 for none.
    pub parent_round: u32,
    /// Memory comes from a lazy-pages daemon already listening in the CRIU
    /// work dir (post-copy).
    pub lazy: bool,
}

/// `<state>/containers/<id>`: everything the destination keeps for one
/// container.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    pub root: PathBuf,
}

impl ContainerDir {
    /// Creates the directory, and the container's dir in the image dir that
    /// its `images` links to; fails if it exists, which means another
    /// migration of this id is under way or left its state behind.
    pub fn claim(state_dir: &Path, images: &ImageDir, id: &str) -> Result<Self> {
        let parent = state_dir.join("containers");
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let root = parent.join(id);
        match std::fs::create_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "{} exists: another migration of {id} is under way, or a container of that name was restored \
                 here before (remove it first)",
                root.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("creating {}", root.display())),
        }
        let dir = Self { root };
        // The container dir is ours now, so images under its id are left
        // from an earlier migration that could not remove them.
        images.remove(id);
        let held_in = images.of(id);
        let made = dir.make_layout(&held_in);
        if made.is_err() {
            images.remove(id);
            let _ = std::fs::remove_dir_all(&dir.root);
        }
        made.map(|()| dir)
    }

    fn make_layout(&self, held_in: &Path) -> Result<()> {
        let dir = self;
        for sub in [
            dir.upper(),
            dir.work(),
            dir.rootfs(),
            dir.bundle(),
            held_in.to_owned(),
            dir.criu_work(),
        ] {
            std::fs::create_dir(&sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        std::os::unix::fs::symlink(held_in, dir.images()).with_context(|| {
            format!(
                "linking {} to {}",
                dir.images().display(),
                held_in.display()
            )
        })
    }

    pub fn upper(&self) -> PathBuf {
        self.root.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.root.join("rootfs")
    }
    pub fn bundle(&self) -> PathBuf {
        self.root.join("bundle")
    }
    /// A link to the container's dir in the image dir (a tmpfs).
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn criu_work(&self) -> PathBuf {
        self.root.join("criu")
    }
    pub fn stdio_log(&self) -> PathBuf {
        self.root.join("stdio.log")
    }
    pub fn runc_log(&self) -> PathBuf {
        self.root.join("runc.log")
    }
    /// Where CRIU's post-restore hook asks whether the held container may run.
    pub fn hold_socket(&self) -> PathBuf {
        self.root.join("hold.sock")
    }
    /// This container's durable record.
    pub fn record(&self) -> PathBuf {
        self.root.join("migration.json")
    }
    /// The layers this container uses, which garbage collection keeps.
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers.json")
    }
}

/// A `runc restore` under way. CRIU's post-restore action holds the
/// restored processes, not running, until [`Restoring::decide`]: `Proceed`
/// lets them run, `Undo` makes CRIU kill them. The hook outlives this
/// daemon: a restarted one finds the container from its record and answers
/// in its place ([`Restoring::adopt`]).
#[derive(Debug)]
pub struct Restoring {
    gate: Gate,
    end: End,
    /// The fsync of the upper dir's tree, under way beside the restore; `None`
    /// once waited for, or for an adopted copy (held, so synced before).
    upper_synced: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    holder_pid: Option<u32>,
    started: Instant,
    decided_at: Option<Instant>,
    id: String,
    dir: ContainerDir,
    state_dir: PathBuf,
    runc: Runc,
    runc_log: PathBuf,
    criu_work: PathBuf,
}

impl Restoring {
    /// Mounts the rootfs and starts `runc restore` with what was
    /// [prepared](crate::prepare) while the images came.
    pub fn start(
        daemon: &Daemon,
        hello: &Hello,
        dir: &ContainerDir,
        plan: RestorePlan,
        prepared: Prepared,
    ) -> Result<Self, Failed> {
        let started = Instant::now();
        let id = &hello.container_id;
        let keep = |failed| keep_logs_of(daemon, id, dir, failed);
        let images = final_images(dir, plan.parent_round)
            .map_err(|e| keep(failed("preparing the images", &e, String::new())))?;
        // Only now: the upper dir is complete, and overlayfs leaves changes
        // made to the upper dir of a mounted overlay undefined.
        mount_rootfs(daemon, hello, dir)
            .map_err(|e| keep(failed("mounting the rootfs", &e, String::new())))?;
        // Beside the restore, which reads its images from memory: the
        // upper dir's files are still in the page cache.
        let upper = dir.upper();
        let upper_synced = tokio::task::spawn_blocking(move || crate::durable::sync_tree(&upper));
        let gate = Gate::bind(&dir.hold_socket(), POST_RESTORE)
            .map_err(|e| keep(failed("holding the restore", &e.into(), String::new())))?;
        let Prepared {
            criu_config,
            options,
            stdout,
            stderr,
        } = prepared;
        tracing::debug!(
            ms = started.elapsed().as_millis(),
            "rootfs mounted; runc restore"
        );
        let (bundle, criu_work, runc_log) = (dir.bundle(), dir.criu_work(), dir.runc_log());
        let spec = RestoreSpec {
            id,
            bundle: &bundle,
            image_dir: &images,
            work_dir: &criu_work,
            runc_log: &runc_log,
            lazy: plan.lazy,
            criu_config: Some(&criu_config),
            options,
        };
        let mut child =
            tokio::process::Command::from(daemon.runc.restore_command(&spec, stdout, stderr))
                .kill_on_drop(false)
                .spawn()
                .map_err(|e| {
                    keep(failed(
                        "restore",
                        &anyhow::Error::from(e).context("starting runc restore"),
                        String::new(),
                    ))
                })?;
        let holder_pid = child.id();
        let (ended, end) = oneshot::channel();
        tokio::spawn(async move {
            let _ = ended.send(child.wait().await);
        });
        Ok(Self {
            gate,
            end: End::Child(Some(end)),
            upper_synced: Some(upper_synced),
            holder_pid,
            started,
            decided_at: None,
            id: id.clone(),
            dir: dir.clone(),
            state_dir: daemon.state_dir.clone(),
            runc: daemon.runc.clone(),
            runc_log,
            criu_work,
        })
    }

    /// Takes over the hold of a copy restored by a daemon that is gone: its
    /// hook keeps asking at the hold socket, and `holder_pid` (its `runc
    /// restore`) ends once the hook has its answer.
    pub fn adopt(
        daemon: &Daemon,
        id: &str,
        dir: &ContainerDir,
        holder_pid: Option<u32>,
    ) -> Result<Self> {
        let socket = dir.hold_socket();
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", socket.display())),
        }
        let gate = Gate::bind(&socket, POST_RESTORE)?;
        let pid = holder_pid
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| anyhow::anyhow!("the record of {id} names no runc restore"))?;
        Ok(Self {
            gate,
            end: End::Adopted(pid),
            upper_synced: None,
            holder_pid,
            started: Instant::now(),
            decided_at: None,
            id: id.to_owned(),
            dir: dir.clone(),
            state_dir: daemon.state_dir.clone(),
            runc: daemon.runc.clone(),
            runc_log: dir.runc_log(),
            criu_work: dir.criu_work(),
        })
    }

    /// The `runc restore` process holding the copy.
    pub fn holder_pid(&self) -> Option<u32> {
        self.holder_pid
    }

    /// Waits until CRIU holds the restored processes at post-restore. A
    /// restore that fails first comes back as the message for the source,
    /// its logs kept under `<state>/failed/`.
    pub async fn held(&mut self) -> Result<Restored, Failed> {
        loop {
            tokio::select! {
                event = self.gate.next_event() => match event {
                    Some(event) if event.action == POST_RESTORE => break,
                    Some(_) => {}
                    None => return Err(self.failure("the CRIU action gate closed".into())),
                },
                status = self.end.wait() => {
                    let status = status.map_err(|e| self.failure(format!("waiting for runc restore: {e}")))?;
                    return Err(self.restore_failed(status));
                }
            }
        }
        // runc may record the container only once CRIU tells it of the
        // restore, which it may do after running this hook: the pid is
        // for the log, not a condition.
        let pid = self.runc.state(&self.id).map(|s| s.pid).unwrap_or_default();
        Ok(Restored {
            restore_ms: millis(self.started.elapsed()),
            pid,
        })
    }

    /// Waits until the upper dir (the container's rootfs changes) is on
    /// disk. Before the source hears `Restored`: once it decides, its copy
    /// goes, and this one's rootfs must survive a crash of this host.
    pub async fn upper_durable(&mut self) -> Result<()> {
        let Some(syncing) = self.upper_synced.take() else {
            return Ok(());
        };
        let upper = self.dir.upper();
        syncing
            .await
            .context("the sync of the upper dir panicked")?
            .with_context(|| format!("syncing the filesystem of {}", upper.display()))
    }

    /// Lets the held processes run, or makes CRIU kill them.
    pub fn decide(&mut self, verdict: Verdict) {
        self.decided_at.get_or_insert_with(Instant::now);
        self.gate.decide(verdict);
    }

    /// Waits for `runc restore` to end after the verdict: success means the
    /// processes run. Cancel-safe; once it has answered, later calls wait
    /// forever.
    pub async fn ended(&mut self) -> Result<u64, Failed> {
        let status = self
            .end
            .wait()
            .await
            .map_err(|e| self.failure(format!("waiting for runc restore: {e}")))?;
        if let Some(status) = status.filter(|s| !s.success()) {
            return Err(self.restore_failed(Some(status)));
        }
        let state = self
            .runc
            .state(&self.id)
            .map_err(|e| self.failure(format!("checking the released container: {e}")))?;
        if !state.is_running() {
            return Err(self.failure(format!(
                "runc reports the released container {}, not running",
                state.status
            )));
        }
        // The container runs: a guard left on would only keep it from
        // refusing connections, and a missed announcement delays its peers
        // until it sends; neither is a reason to fail what is done.
        match network::restored(&self.dir.bundle(), state.pid) {
            Ok(Some(told)) => tracing::info!(
                container = %self.id,
                announcements = told.announcements,
                reset_probes = told.reset_probes,
                "told the container's peers where it is"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(container = %self.id, error = %format!("{e:#}"), "restored container's network")
            }
        }
        Ok(self
            .decided_at
            .map(|at| millis(at.elapsed()))
            .unwrap_or_default())
    }

    fn restore_failed(&self, status: Option<ExitStatus>) -> Failed {
        let (runc_log, criu_log) = restore_logs(&self.runc_log, &self.criu_work);
        let how = status.map_or_else(|| "ended".to_owned(), |s| format!("exited with {s}"));
        self.keep(Failed {
            stage: "restore".into(),
            message: format!("`runc restore` {how}: {runc_log}"),
            criu_log_tail: criu_log,
        })
    }

    fn failure(&self, message: String) -> Failed {
        self.keep(Failed {
            stage: "restore".into(),
            message,
            criu_log_tail: log_tail(&self.criu_work.join("restore.log"), LOG_TAIL_LINES),
        })
    }

    fn keep(&self, failed: Failed) -> Failed {
        keep_logs_in(&self.state_dir, &self.id, &self.dir, failed)
    }
}

/// How the end of `runc restore` is seen: as our child, or, adopted from
/// a daemon that is gone, through its pid (its status is then unknown).
#[derive(Debug)]
enum End {
    Child(Option<oneshot::Receiver<std::io::Result<ExitStatus>>>),
    Adopted(i32),
    Ended(Option<ExitStatus>),
}

impl End {
    /// Cancel-safe; once it has ended, answers at once.
    async fn wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let status = match self {
            End::Ended(status) => return Ok(*status),
            End::Child(None) => return Err(std::io::Error::other("lost track of runc restore")),
            End::Child(Some(receiver)) => {
                let status = receiver
                    .await
                    .map_err(|_| std::io::Error::other("lost track of runc restore"))??;
                Some(status)
            }
            End::Adopted(pid) => {
                // No bound: the hook answers when the source decides.
                migrate_common::process::wait_for_exit(*pid, std::time::Duration::MAX).await?;
                None
            }
        };
        *self = End::Ended(status);
        Ok(status)
    }
}

/// runc's and CRIU's own words about a failed restore.
fn restore_logs(runc_log: &Path, criu_work: &Path) -> (String, String) {
    Runc::restore_failure_logs(runc_log, &criu_work.join("restore.log"))
}

fn keep_logs_of(daemon: &Daemon, id: &str, dir: &ContainerDir, failed: Failed) -> Failed {
    keep_logs_in(&daemon.state_dir, id, dir, failed)
}

/// Moves the failed restore's logs out of the container dir (which the
/// rollback removes) to `<state>/failed/<id>-<time>/`, and points the
/// message there.
fn keep_logs_in(state_dir: &Path, id: &str, dir: &ContainerDir, mut failed: Failed) -> Failed {
    match keep_logs(state_dir, id, dir) {
        Ok(kept) => {
            let old = dir.root.to_string_lossy().into_owned();
            let new = kept.to_string_lossy().into_owned();
            failed.message = failed.message.replace(&old, &new);
            failed.criu_log_tail = failed.criu_log_tail.replace(&old, &new);
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "keeping the logs of a failed restore")
        }
    }
    failed
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Moves the logs of a failed restore where the rollback will not remove
/// them. The copy mirrors the container dir's layout, so paths in messages
/// can be rewritten by prefix.
fn keep_logs(state_dir: &Path, id: &str, dir: &ContainerDir) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let kept = state_dir.join("failed").join(format!("{id}-{stamp}"));
    std::fs::create_dir_all(&kept).with_context(|| format!("creating {}", kept.display()))?;
    for (from, to) in [
        (dir.criu_work(), kept.join("criu")),
        (dir.runc_log(), kept.join("runc.log")),
        (dir.stdio_log(), kept.join("stdio.log")),
    ] {
        if from.exists() {
            std::fs::rename(&from, &to)
                .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(kept)
}

fn failed(stage: &str, error: &anyhow::Error, criu_log_tail: String) -> Failed {
    Failed {
        stage: stage.into(),
        message: format!("{error:#}"),
        criu_log_tail,
    }
}

/// The final dump's image dir, linked to the round it builds on.
pub fn final_images(dir: &ContainerDir, parent_round: u32) -> Result<PathBuf> {
    let images = dump_dir(&dir.images(), 0)?;
    if parent_round > 0 {
        link_parent(&images, parent_round)?;
    }
    Ok(images)
}

/// Mounts the overlay from the layer store and the received upper dir.
fn mount_rootfs(daemon: &Daemon, hello: &Hello, dir: &ContainerDir) -> Result<()> {
    let lowers = hello
        .layers
        .iter()
        .map(|l| Ok(daemon.store.path(&LayerDigest::parse(&l.digest)?)))
        .collect::<Result<Vec<_>>>()?;
    mount_overlay(&lowers, &dir.upper(), &dir.work(), &dir.rootfs())?;
    Ok(())
}

/// Removes every trace of a container that is not (or no longer) wanted
/// here: the restored processes if any, runc's record, mounts, files.
/// Leftover mounts under runc's state dir go first: `runc delete` removes
/// that dir recursively, through a leftover `criu-root` bind mount into the
/// container's rootfs.
pub fn discard(daemon: &Daemon, id: &str, dir: &ContainerDir) {
    // Nothing reads them any more: the restore, if any, has ended.
    daemon.images.remove(id);
    let runc_dir = daemon.runc.state_dir(id);
    if let Err(e) = unmount_all_under(&runc_dir) {
        tracing::error!(error = %e, "unmounting leftovers under {}; not deleting", runc_dir.display());
        return;
    }
    // --force kills the container's processes if they still run.
    if daemon.runc.exists(id) {
        if let Err(e) = daemon.runc.delete_force(id) {
            tracing::warn!(error = %e, "runc delete {id}");
        }
    }
    match unmount_all_under(&dir.root) {
        Ok(_) => {
            if let Err(e) = std::fs::remove_dir_all(&dir.root) {
                tracing::warn!(error = %e, "removing {}", dir.root.display());
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "unmounting under {}; leaving it in place", dir.root.display())
        }
    }
}

/// After the commit: the images are no longer needed (they hold the
/// container's memory, in memory); CRIU's logs stay for the record. The
/// link goes too: a container dir without it runs its container here (see
/// [`crate::restart::status`]).
pub fn drop_images(daemon: &Daemon, id: &str, dir: &ContainerDir) {
    daemon.images.remove(id);
    match std::fs::remove_file(dir.images()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, "removing {}", dir.images().display()),
    }
}

/// At start-up: removes what migrations interrupted by a crash or kill of
/// this daemon left behind. A container dir whose container runc does not
/// know was never restored (or was deleted since), so nothing runs from it.
pub fn remove_stale(daemon: &Daemon) -> Result<Vec<String>> {
    let parent = daemon.state_dir.join("containers");
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(&parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("listing {}", parent.display())),
    };
    for entry in entries {
        let entry = entry?;
        let id = entry.file_name().to_string_lossy().into_owned();
        let dir = ContainerDir { root: entry.path() };
        // A record says a copy is held or runs here: adopted, not stale.
        let recorded = migrate_common::record::load::<migrate_common::record::DestinationRecord>(
            &dir.record(),
        );
        if !migrate_common::valid_container_id(&id)
            || daemon.runc.exists(&id)
            || !matches!(recorded, Ok(None))
        {
            continue;
        }
        discard(daemon, &id, &dir);
        removed.push(id);
    }
    Ok(removed)
}
