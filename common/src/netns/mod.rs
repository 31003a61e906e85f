//! A container's network namespace, via `ip`, `nsenter`, `sysctl` and
//! `iptables`: its network identity found on the source and made again on
//! the destination, loopback brought up, and the packet filters around a
//! restore.
//!
//! runc checkpoints a container that has a network namespace of its own
//! without that namespace's state, so after `runc restore` its loopback is
//! down and a server bound to 127.0.0.1 inside answers "Network is
//! unreachable". runc runs the config's createRuntime hooks during restore at
//! CRIU's setup-namespaces step, before the processes resume; the destination
//! adds `migrate-dst network-hook` there, which calls [`bring_up_loopback`].
//!
//! A container on a bridge moves with its interfaces too. On the source,
//! [`discover`] reads them ([`identity`] parses and checks what `ip -j`
//! prints); the destination checks the identity it receives, runs its
//! preflight ([`missing_bridges`], [`addresses_in_use`]) and in the hook,
//! in the host's namespace, [`recreate`]s the veths (sockets are restored
//! after the hook, and they need their addresses) and [`guard_resets`]
//! until the restore returns, then [`lift_reset_guard`] and [`tell_peers`]
//! where its addresses are now and which connections are gone (the source
//! reads them with [`open_connections`]).
//!
//! Children enter the container's namespace through `nsenter`, never the
//! calling process: the source agent is a multi-threaded tokio program and
//! setns applies to the calling thread only.

mod connections;
pub mod identity;
mod ip;
mod ip_json;
mod iptables;
mod peers;
mod recreate;

use std::io::Read;
use std::process::Command;

use serde::Deserialize;

use crate::process::{run, ToolError};

pub use connections::open_connections;
pub use identity::{check_identity, parse_identity, IdentityError};
pub use ip::{addresses_in_use, discover, host_veth_name, missing_bridges, remove_host_end};
pub use ip_json::JsonError;
pub use iptables::{guard_resets, lift_reset_guard, remove_criu_network_lock};
pub use peers::{announcements, reset_probes, tell_peers, Announcement, ResetProbe, Told};
pub use recreate::recreate;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("reading the OCI state from the hook's stdin")]
    ReadState(#[source] std::io::Error),
    #[error("the OCI state on the hook's stdin is not valid")]
    ParseState(#[source] serde_json::Error),
    #[error("opening network namespace {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {path}")]
    Enter {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    Ip(#[from] ToolError),
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// One step of making an interface again, with the tool's output.
    #[error("{step}")]
    Step {
        step: String,
        #[source]
        source: ToolError,
    },
    #[error("{interfaces} interfaces but {names} names for their host ends")]
    HostNames { interfaces: usize, names: usize },
    #[error("{name:?} is not a valid interface name")]
    InvalidName { name: String },
    #[error("{name} is a {kind}, not a veth: not deleting it")]
    NotVeth { name: String, kind: String },
    #[error("telling the container's peers where it is: {0}")]
    Announce(String),
}

/// The part of the OCI runtime state a hook receives that we need.
#[derive(Debug, Deserialize)]
pub struct HookState {
    pub pid: u32,
}

pub fn read_hook_state(mut input: impl Read) -> Result<HookState, NetnsError> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .map_err(NetnsError::ReadState)?;
    serde_json::from_str(&text).map_err(NetnsError::ParseState)
}

/// Enters the network namespace of `pid` and sets `lo` up. Must run in a
/// single-threaded process (setns applies to the calling thread only, and the
/// `ip` child inherits it from there). The process stays in that namespace:
/// what must run in the host's ([`recreate`]) comes first.
pub fn bring_up_loopback(pid: u32) -> Result<(), NetnsError> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).map_err(|source| NetnsError::Open {
        path: path.clone(),
        source,
    })?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|source| NetnsError::Enter { path, source })?;
    run(Command::new("ip").args(["link", "set", "dev", "lo", "up"]))?;
    Ok(())
}

/// `program` run in the network namespace of `pid` (and only that one of
/// its namespaces: the tools and their files stay the host's).
fn in_netns(pid: u32, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{pid}/ns/net")).arg(program);
    cmd
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_pid_from_oci_state() {
        let state =
            r#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":4242,"bundle":"/b"}"#;
        assert_eq!(read_hook_state(state.as_bytes()).unwrap().pid, 4242);
        assert!(read_hook_state("{}".as_bytes()).is_err());
    }

    #[test]
    fn children_enter_only_the_network_namespace() {
        let cmd = in_netns(42, "ip");
        assert_eq!(
            crate::process::describe(&cmd),
            "nsenter --net=/proc/42/ns/net ip"
        );
    }
}
