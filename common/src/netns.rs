//! A container's network namespace, via `ip`, `nsenter` and `iptables`:
//! bringing a restored one's loopback up, and removing the network lock a
//! failed lazy dump leaves behind.
//!
//! runc checkpoints a container that has a network namespace of its own
//! without that namespace's state, so after `runc restore` its loopback is
//! down and a server bound to 127.0.0.1 inside answers "Network is
//! unreachable". runc runs the config's createRuntime hooks during restore at
//! CRIU's setup-namespaces step, before the processes resume; the destination
//! adds `migrate-dst network-hook` there, which calls [`bring_up_loopback`].

use std::io::Read;
use std::process::Command;

use serde::Deserialize;

use crate::process::{run, ToolError};

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
/// `ip` child inherits it from there).
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

/// Removes CRIU's network lock from the network namespace of `pid`: the
/// `CRIU` chain that drops every packet not marked by CRIU, jumped to from
/// INPUT and OUTPUT, for IPv4 and IPv6. CRIU removes it itself after a dump
/// it resumes from, except when a lazy dump's page transfer fails: it has
/// already decided to keep the lock (the copy was meant to live elsewhere)
/// and never takes it off. Returns whether a lock was found.
pub fn remove_criu_network_lock(pid: u32) -> Result<bool, NetnsError> {
    let netns = format!("--net=/proc/{pid}/ns/net");
    let mut found = false;
    for tool in ["iptables", "ip6tables"] {
        let table = |args: &[&str]| {
            run(Command::new("nsenter")
                .arg(&netns)
                .arg(tool)
                .arg("-w")
                .args(args))
        };
        // Repeat: the iptables-nft backend may hold the jump more than once.
        while table(&["-C", "INPUT", "-j", "CRIU"]).is_ok() {
            found = true;
            table(&["-D", "INPUT", "-j", "CRIU"])?;
        }
        while table(&["-C", "OUTPUT", "-j", "CRIU"]).is_ok() {
            found = true;
            table(&["-D", "OUTPUT", "-j", "CRIU"])?;
        }
        if table(&["-S", "CRIU"]).is_ok() {
            found = true;
            table(&["-F", "CRIU"])?;
            table(&["-X", "CRIU"])?;
        }
    }
    Ok(found)
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
}
