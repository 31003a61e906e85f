//! The preflight alone: would this destination take this container, moved
//! this way, and why not? Nothing is frozen, claimed or recorded; the
//! destination answers a `Hello` marked `preflight_only` with its verdict
//! and the exchange ends. `migrate check` and `migrate drain` (its dry run
//! and its placement) ask it.

use anyhow::{bail, Context, Result};
use migrate_common::certs::TlsDir;
use migrate_common::protocol::{Body, ControlMessage, PreflightCheck, PreflightReply};
use serde::Serialize;

use crate::freeze::{hello, inspect_and_choose};
use crate::link::{Dial, Link};
use crate::{mode, MigrateOptions};

/// One destination's answer about one container.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub container: String,
    pub destination: String,
    /// The mode the migration would use, as `auto` would choose it here.
    pub mode: &'static str,
    pub memory_bytes: u64,
    pub upper_bytes: u64,
    pub accepted: bool,
    pub refusals: Vec<String>,
    /// What the destination said of itself.
    pub hostname: String,
    pub free_bytes: u64,
    pub image_free_bytes: u64,
    pub mem_available_bytes: u64,
    pub criu_version: String,
    pub runc_version: String,
    pub missing_layers: usize,
    /// Every check the destination ran, in its order; empty from a
    /// destination older than the items (its refusals say why it refused).
    pub items: Vec<Item>,
}

/// One check the destination ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl From<PreflightCheck> for Item {
    fn from(check: PreflightCheck) -> Self {
        Self {
            name: check.name,
            ok: check.ok,
            detail: check.detail,
        }
    }
}

/// Asks `opts.destination` about `opts.container_id`.
pub async fn preflight_only(opts: &MigrateOptions, tls: &TlsDir) -> Result<Verdict> {
    let inspected = inspect_and_choose(opts).await?;
    let dial = Dial {
        destination: &opts.destination,
        tls,
        idle_timeout: opts.link_timeout,
    };
    let mut link = Link::connect(&dial).await?;
    let mut question = hello(
        opts,
        &inspected.container,
        &inspected.criu_version,
        inspected.cpuinfo.clone(),
        inspected.choice.mode,
        "",
    );
    question.preflight_only = true;
    let asked = || format!("asking {} for its preflight", opts.destination);
    link.control.send(question).await.with_context(asked)?;
    let reply = match link.control.recv().await.with_context(asked)?.body {
        Some(Body::PreflightReply(reply)) => reply,
        other => bail!(
            "{} answered {} to a preflight",
            opts.destination,
            ControlMessage { body: other }.kind()
        ),
    };
    link.close().await;
    Ok(verdict(
        opts,
        &inspected.container,
        inspected.choice.mode,
        reply,
    ))
}

fn verdict(
    opts: &MigrateOptions,
    container: &crate::inspect::Container,
    memory_mode: migrate_common::protocol::MemoryMode,
    reply: PreflightReply,
) -> Verdict {
    Verdict {
        container: opts.container_id.clone(),
        destination: opts.destination.clone(),
        mode: mode::name(memory_mode),
        memory_bytes: container.memory_bytes,
        upper_bytes: container.upper_bytes,
        accepted: reply.accepted,
        refusals: reply.refusals,
        hostname: reply.hostname,
        free_bytes: reply.free_bytes,
        image_free_bytes: reply.image_free_bytes,
        mem_available_bytes: reply.mem_available_bytes,
        criu_version: reply.criu_version,
        runc_version: reply.runc_version,
        missing_layers: reply.missing_layers.len(),
        items: reply.checks.into_iter().map(Item::from).collect(),
    }
}
