//! At `LayersReady` on the destination: what the restore needs that does
//! not depend on the images (the bundle's config.json rewritten for this
//! host, CRIU's restore configuration and action script, the container's
//! log shim), made while the source still dumps, so that once the last
//! image arrives only the rootfs mount and `runc restore` are left. The
//! overlay is not mounted here: the upper dir's frozen changes come with
//! the images, and overlayfs leaves changes to the upper dir of a mounted
//! overlay undefined.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};
use migrate_common::bundle::{BundleConfig, DestinationRewrite, Hook};
use migrate_common::criu::ConfigFile;
use migrate_common::hook::{action_script, write_action_script, DESTINATION_ACTIONS};
use migrate_common::protocol::Hello;
use migrate_common::runc::CriuOptions;

use crate::network;
use crate::restore::ContainerDir;
use crate::Daemon;

/// What [`crate::restore::Restoring::start`] takes ready-made. Dropping it
/// closes the pipe to the log shim, which then ends.
#[derive(Debug)]
pub struct Prepared {
    pub criu_config: PathBuf,
    pub options: CriuOptions,
    /// The write ends of the pipe to the log shim, for the restored
    /// processes' stdout and stderr.
    pub stdout: Stdio,
    pub stderr: Stdio,
}

/// Prepares the restore of `hello`'s container in `dir`.
pub fn prepare(daemon: &Daemon, hello: &Hello, dir: &ContainerDir) -> Result<Prepared> {
    let options = CriuOptions::from_names(hello.tcp_established, &hello.criu_options)
        .context("reading the CRIU options")?;
    let cgroups_path = write_bundle(daemon, hello, dir).context("preparing the bundle")?;
    let criu_config = restore_config(daemon, dir, cgroups_path.as_deref(), &options)
        .context("preparing CRIU's configuration")?;
    let (stdout, stderr) = spawn_log_shim(daemon, dir).context("starting the log shim")?;
    Ok(Prepared {
        criu_config,
        options,
        stdout,
        stderr,
    })
}

/// The restore's CRIU configuration: the action script that holds the
/// restored processes at post-restore, and on cgroup v2 hosts where their
/// cgroups go: runc does that itself on cgroup v1 only (its `CgRoot` list),
/// and on v2 CRIU would put them back under the cgroup path they were dumped
/// from, ignoring `--cgroup-parent`. The root is the container's cgroup, as
/// runc's v1 list makes it.
fn restore_config(
    daemon: &Daemon,
    dir: &ContainerDir,
    cgroups_path: Option<&str>,
    options: &CriuOptions,
) -> Result<PathBuf> {
    let script = dir.root.join("criu-action.sh");
    write_action_script(
        &script,
        &action_script(&daemon.exe, &dir.hold_socket(), DESTINATION_ACTIONS, &[]),
    )?;
    let cgroup_v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let cgroup_root = cgroups_path
        .filter(|_| daemon.cgroup_parent.is_some() && cgroup_v2)
        .map(str::to_owned);
    let config = dir.root.join("criu-restore.conf");
    let mut file = ConfigFile {
        action_script: Some(script),
        cgroup_root,
        ..ConfigFile::default()
    };
    options.apply_to_restore(&mut file);
    file.write(&config)?;
    Ok(config)
}

/// Writes config.json rewritten for this host (its rootfs where the overlay
/// will be mounted); returns its cgroupsPath.
fn write_bundle(daemon: &Daemon, hello: &Hello, dir: &ContainerDir) -> Result<Option<String>> {
    let mut config = BundleConfig::parse(&hello.config_json)?;
    let mut hook_args = vec!["migrate-dst".to_owned(), "network-hook".to_owned()];
    if let Some(identity) = &hello.network {
        let hook = network::prepare(&dir.bundle(), &hello.container_id, identity)
            .context("preparing the container's network identity")?;
        hook_args.extend(hook.args());
    }
    config.rewrite_for_destination(&DestinationRewrite {
        container_id: hello.container_id.clone(),
        rootfs: dir.rootfs(),
        cgroup_parent: daemon.cgroup_parent.clone(),
        network_hook: Some(Hook {
            path: daemon.exe.clone(),
            args: hook_args,
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
