//! Phase 7 on the destination: rebuild the rootfs, write the bundle, and
//! `runc restore` the container; or, on failure, remove every trace of it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use migrate_common::bundle::{BundleConfig, DestinationRewrite, Hook};
use migrate_common::criu::ConfigFile;
use migrate_common::mount::{mount_overlay, unmount_all_under};
use migrate_common::protocol::{Failed, Hello, Restored};
use migrate_common::rootfs::digest::LayerDigest;
use migrate_common::runc::{CriuOptions, RestoreSpec, RuncError};

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
    /// Creates the directory; fails if it exists, which means another
    /// migration of this id is under way or left its state behind.
    pub fn claim(state_dir: &Path, id: &str) -> Result<Self> {
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
        for sub in [
            dir.upper(),
            dir.work(),
            dir.rootfs(),
            dir.bundle(),
            dir.images(),
            dir.criu_work(),
        ] {
            std::fs::create_dir(&sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        Ok(dir)
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
}

/// Restores the container; on failure returns the message for the source,
/// after moving CRIU's and runc's logs out of the container dir (which the
/// rollback removes) to `<state>/failed/<id>-<time>/`, where the message
/// points.
pub fn restore(
    daemon: &Daemon,
    hello: &Hello,
    dir: &ContainerDir,
    plan: RestorePlan,
) -> Result<Restored, Failed> {
    restore_in(daemon, hello, dir, plan).map_err(|mut failed| {
        match keep_logs(daemon, &hello.container_id, dir) {
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
    })
}

/// Moves the logs of a failed restore where the rollback will not remove
/// them. The copy mirrors the container dir's layout, so paths in messages
/// can be rewritten by prefix.
fn keep_logs(daemon: &Daemon, id: &str, dir: &ContainerDir) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let kept = daemon
        .state_dir
        .join("failed")
        .join(format!("{id}-{stamp}"));
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

fn restore_in(
    daemon: &Daemon,
    hello: &Hello,
    dir: &ContainerDir,
    plan: RestorePlan,
) -> Result<Restored, Failed> {
    let started = Instant::now();
    let images = final_images(dir, plan.parent_round)
        .map_err(|e| failed("preparing the images", &e, String::new()))?;
    let cgroups_path = prepare(daemon, hello, dir)
        .map_err(|e| failed("preparing the bundle", &e, String::new()))?;
    let criu_config = restore_config(daemon, dir, cgroups_path.as_deref())
        .map_err(|e| failed("preparing CRIU's configuration", &e, String::new()))?;
    let id = &hello.container_id;
    let (stdout, stderr) = spawn_log_shim(daemon, dir)
        .map_err(|e| failed("starting the log shim", &e, String::new()))?;
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        "bundle ready; runc restore"
    );
    let (bundle, criu_work, runc_log) = (dir.bundle(), dir.criu_work(), dir.runc_log());
    let spec = RestoreSpec {
        id,
        bundle: &bundle,
        image_dir: &images,
        work_dir: &criu_work,
        runc_log: &runc_log,
        lazy: plan.lazy,
        criu_config: criu_config.as_deref(),
        options: CriuOptions {
            tcp_established: hello.tcp_established,
        },
    };
    daemon
        .runc
        .restore(&spec, stdout, stderr)
        .map_err(|e| match e {
            RuncError::Restore {
                status,
                runc_log,
                criu_log,
                ..
            } => Failed {
                stage: "restore".into(),
                message: format!("`runc restore` exited with {status}: {runc_log}"),
                criu_log_tail: criu_log,
            },
            other => failed("restore", &other.into(), String::new()),
        })?;
    tracing::debug!(ms = started.elapsed().as_millis(), "runc restore done");
    let state = daemon
        .runc
        .state(id)
        .map_err(|e| failed("checking the restored container", &e.into(), String::new()))?;
    if !state.is_running() {
        return Err(Failed {
            stage: "restore".into(),
            message: format!(
                "runc reports the restored container {}, not running",
                state.status
            ),
            criu_log_tail: migrate_common::criu::log_tail(&dir.criu_work().join("restore.log"), 15),
        });
    }
    Ok(Restored {
        restore_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        pid: state.pid,
    })
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

/// On cgroup v2 hosts, tells CRIU where the restored processes' cgroups go:
/// runc does so itself on cgroup v1 only (its `CgRoot` list), and on v2 CRIU
/// would put them back under the cgroup path they were dumped from, ignoring
/// `--cgroup-parent`. The root is the container's cgroup, as runc's v1 list
/// makes it.
fn restore_config(
    daemon: &Daemon,
    dir: &ContainerDir,
    cgroups_path: Option<&str>,
) -> Result<Option<PathBuf>> {
    let (Some(path), true) = (cgroups_path, daemon.cgroup_parent.is_some()) else {
        return Ok(None);
    };
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return Ok(None);
    }
    let config = dir.root.join("criu-restore.conf");
    ConfigFile {
        cgroup_root: Some(path.to_owned()),
        ..ConfigFile::default()
    }
    .write(&config)?;
    Ok(Some(config))
}

/// Mounts the overlay from the layer store and the received upper dir, and
/// writes config.json rewritten for this host; returns its cgroupsPath.
fn prepare(daemon: &Daemon, hello: &Hello, dir: &ContainerDir) -> Result<Option<String>> {
    let lowers = hello
        .layers
        .iter()
        .map(|l| Ok(daemon.store.path(&LayerDigest::parse(&l.digest)?)))
        .collect::<Result<Vec<_>>>()?;
    mount_overlay(&lowers, &dir.upper(), &dir.work(), &dir.rootfs())?;
    let mut config = BundleConfig::parse(&hello.config_json)?;
    config.rewrite_for_destination(&DestinationRewrite {
        container_id: hello.container_id.clone(),
        rootfs: dir.rootfs(),
        cgroup_parent: daemon.cgroup_parent.clone(),
        network_hook: Some(Hook {
            path: daemon.exe.clone(),
            args: vec!["migrate-dst".into(), "network-hook".into()],
        }),
    })?;
    let path = dir.bundle().join("config.json");
    std::fs::write(&path, config.to_json())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(config.cgroups_path().map(str::to_owned))
}

/// Starts `migrate-dst log-shim`, a small process of its own that appends
/// what the container writes to its stdout and stderr to `stdio.log`; returns
/// the pipe ends to give the restored processes. A pipe, not the file
/// itself, so that the container stays checkpointable: CRIU cannot dump a
/// descriptor on a host file.
fn spawn_log_shim(daemon: &Daemon, dir: &ContainerDir) -> Result<(Stdio, Stdio)> {
    // Close-on-exec, so that no other child of this daemon (the shim itself
    // included) holds the write end and keeps the shim from seeing EOF.
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the stdio pipe")?;
    let mut cmd = tokio::process::Command::new(&daemon.exe);
    cmd.arg("log-shim")
        .arg(dir.stdio_log())
        .stdin(Stdio::from(read_end))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    // Dropping the child leaves it running; tokio reaps it when it exits.
    cmd.spawn().context("starting migrate-dst log-shim")?;
    let stderr = write_end
        .try_clone()
        .context("duplicating the stdio pipe")?;
    Ok((Stdio::from(write_end), Stdio::from(stderr)))
}

/// Removes every trace of a container that is not (or no longer) wanted
/// here: the restored processes if any, runc's record, mounts, files.
/// Leftover mounts under runc's state dir go first: `runc delete` removes
/// that dir recursively, through a leftover `criu-root` bind mount into the
/// container's rootfs.
pub fn discard(daemon: &Daemon, id: &str, dir: &ContainerDir) {
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

/// After the commit: the images are no longer needed (they can be large);
/// CRIU's logs stay for the record.
pub fn drop_images(dir: &ContainerDir) {
    if let Err(e) = std::fs::remove_dir_all(dir.images()) {
        tracing::warn!(error = %e, "removing {}", dir.images().display());
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
        if !migrate_common::valid_container_id(&id) || daemon.runc.exists(&id) {
            continue;
        }
        discard(daemon, &id, &ContainerDir { root: entry.path() });
        removed.push(id);
    }
    Ok(removed)
}
