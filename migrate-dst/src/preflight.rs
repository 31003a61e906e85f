//! Phases 2 and 3 on the destination. [`admit`]: may this source push
//! containers here at all (`--allow`)? Checked on a connection's first
//! message, before anything else; a refused source hears why and nothing
//! about this host. [`run`]: can this host take the container, and does the
//! destination's policy let it do what its config asks (`--allow-bind`,
//! `--allow-privileged`)? Every check runs, so the source hears all the
//! reasons at once, and none of them changes anything but the claim on the
//! container's id.

use std::path::Path;

use anyhow::{Context, Result};
use indicatif::HumanBytes;
use migrate_common::bundle::BundleConfig;
use migrate_common::criu::{ensure_pipe_max_size, PipeMaxSize, MIN_VERSION};
use migrate_common::policy::Policy;
use migrate_common::protocol::{
    read_frame_within, write_frame, Body, ControlChannel, ControlMessage, Failed, Hello,
    MemoryMode, PreflightReply, PROTOCOL_VERSION,
};
use migrate_common::rootfs::digest::LayerDigest;
use migrate_common::runc::CriuOptions;
use migrate_common::transport;

use crate::gc;
use crate::restore::ContainerDir;
use crate::session::Control;
use crate::Daemon;

/// A source the destination's `--allow` list does not name; the message is
/// the one the source was sent.
#[derive(Debug, thiserror::Error)]
#[error("refused a source: {0}")]
pub struct SourceRefused(String);

/// Room kept free on the state dir's filesystem beyond the estimate.
const DISK_RESERVE: u64 = 256 << 20;

/// The verdict, and on acceptance the claimed container dir.
#[derive(Debug)]
pub struct Preflight {
    pub reply: PreflightReply,
    pub claimed: Option<ContainerDir>,
}

/// Accepts a connection's control stream and reads its first message, if
/// its source may push containers here. Otherwise the first message is
/// read only within [`REFUSED_FRAME_LIMIT`], for its kind, and answered with
/// the refusal (the refused `PreflightReply` of a `Hello`, the `Failed` of a
/// `Resume`), and the result is [`SourceRefused`]: a peer that is not
/// allowed makes the daemon decode no more than a few KiB. A `Resume` is
/// checked too, though the migration it resumes checks that it comes from
/// the source that started it.
pub async fn admit(daemon: &Daemon, conn: &quinn::Connection) -> Result<(Control, Option<Body>)> {
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .context("accepting the control stream")?;
    if daemon.policy.admits(&transport::peer_names(conn)) {
        let mut control = ControlChannel::new(recv, send);
        let first = control.recv().await?;
        return Ok((control, first.body));
    }
    let refusal = daemon.policy.refusal(transport::peer_name(conn).as_deref());
    let first: Option<ControlMessage> = read_frame_within(&mut recv, REFUSED_FRAME_LIMIT)
        .await
        .unwrap_or_default();
    let answer: Option<ControlMessage> = match first.and_then(|m| m.body) {
        Some(Body::Hello(_)) => Some(
            PreflightReply {
                accepted: false,
                refusals: vec![refusal.clone()],
                ..Default::default()
            }
            .into(),
        ),
        Some(Body::Resume(_)) => Some(
            Failed {
                stage: "resume".into(),
                message: refusal.clone(),
                criu_log_tail: String::new(),
            }
            .into(),
        ),
        _ => None,
    };
    if let Some(answer) = answer {
        write_frame(&mut send, &answer).await?;
    }
    let _ = send.finish();
    Err(SourceRefused(refusal).into())
}

/// The most of a refused source's first message that is read: a `Hello` or
/// a `Resume` without its config, layers and the like is far smaller.
const REFUSED_FRAME_LIMIT: usize = 64 << 10;

/// Refuses a `Hello` that came while `limit` migrations are under way.
/// Refused, not queued: nothing is frozen before the preflight, so the
/// source loses nothing and can try again, while a queued source would wait
/// on a preflight whose disk estimate is stale by the time it runs, with no
/// bound on how long.
pub async fn busy(control: &mut Control, limit: usize) -> Result<()> {
    control
        .send(PreflightReply {
            accepted: false,
            refusals: vec![busy_refusal(limit)],
            ..Default::default()
        })
        .await?;
    let _ = control.send_half().finish();
    Ok(())
}

fn busy_refusal(limit: usize) -> String {
    format!(
        "this destination is already receiving {limit} migrations, its limit (migrate-dst \
         --max-migrations {limit}): try again once one has ended"
    )
}

pub fn run(daemon: &Daemon, hello: &Hello) -> Preflight {
    let mut refusals = Vec::new();
    let mut reply = PreflightReply {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..Default::default()
    };

    if hello.protocol_version != PROTOCOL_VERSION {
        refusals.push(format!(
            "protocol version {} is not this destination's {PROTOCOL_VERSION}: upgrade the older side",
            hello.protocol_version
        ));
    }
    let id = hello.container_id.as_str();
    let id_ok = migrate_common::valid_container_id(id);
    if !id_ok {
        refusals.push(format!("{id:?} is not a valid container id"));
    }

    match daemon.criu.version() {
        Ok(v) => {
            reply.criu_version = v.to_string();
            if v < MIN_VERSION {
                refusals.push(format!(
                    "CRIU {v} is older than {MIN_VERSION}, which restore here needs"
                ));
            }
            if let Err(e) = daemon.criu.check() {
                refusals.push(format!("{e}"));
            }
        }
        Err(e) => refusals.push(format!("CRIU is not usable: {e}")),
    }
    if let Err(e) = CriuOptions::from_names(hello.tcp_established, &hello.criu_options) {
        refusals.push(e.to_string());
    }
    match MemoryMode::try_from(hello.mode) {
        Ok(mode) if mode.is_lazy() => match lazy_pages(daemon) {
            Ok(()) => reply.lazy_pages = true,
            Err(problem) => {
                refusals.push(format!(
                    "this host cannot restore with lazy pages, which {mode:?} needs: {problem}"
                ));
                reply.lazy_pages_problem = problem;
            }
        },
        Ok(mode) if mode != MemoryMode::Invalid => {}
        _ => refusals.push(format!(
            "memory mode {} is not one this destination knows",
            hello.mode
        )),
    }
    match daemon.runc.version() {
        Ok(v) => reply.runc_version = v,
        Err(e) => refusals.push(format!("runc is not usable: {e}")),
    }
    if id_ok && daemon.runc.exists(id) {
        refusals.push(format!(
            "a container named {id} already exists in runc root {}",
            daemon.runc.root.display()
        ));
    }

    match BundleConfig::parse(&hello.config_json) {
        Ok(config) => {
            refusals.extend(daemon.policy.check(&config).iter().map(ToString::to_string));
            refusals.extend(unusable_bind_sources(&daemon.policy, &config));
        }
        Err(e) => refusals.push(format!(
            "the container's config.json: {:#}",
            anyhow::Error::from(e)
        )),
    }

    // Held from the first layer found here until the claimed dir names its
    // layers: a garbage collection, which takes it exclusively, cannot
    // remove a layer this preflight tells the source not to send (see
    // `crate::gc`).
    let store_lock = daemon.store.lock_shared();
    if let Err(e) = &store_lock {
        refusals.push(format!("{e:#}"));
    }
    let mut needed = hello.upper_bytes + hello.memory_bytes + DISK_RESERVE;
    for layer in &hello.layers {
        match LayerDigest::parse(&layer.digest) {
            Ok(digest) if daemon.store.has(&digest) => {}
            Ok(_) => {
                reply.missing_layers.push(layer.digest.clone());
                needed += layer.size_bytes;
            }
            Err(e) => refusals.push(format!("layer digest {:?}: {e}", layer.digest)),
        }
    }
    match free_bytes(daemon) {
        Ok(free) => {
            reply.free_bytes = free;
            if free < needed {
                refusals.push(format!(
                    "{} has {} free, the migration needs about {}",
                    daemon.state_dir.display(),
                    HumanBytes(free),
                    HumanBytes(needed)
                ));
            }
        }
        Err(e) => refusals.push(format!(
            "cannot measure free space in {}: {e}",
            daemon.state_dir.display()
        )),
    }

    match mem_available() {
        Ok(available) => {
            reply.mem_available_bytes = available;
            if hello.memory_bytes > available {
                refusals.push(format!(
                    "the container uses {} of memory and this host has {} available",
                    HumanBytes(hello.memory_bytes),
                    HumanBytes(available)
                ));
            }
        }
        Err(e) => refusals.push(format!("cannot read this host's available memory: {e:#}")),
    }

    // Claiming the directory is the lock against a second migration of the
    // same id, so it comes last, and only when everything else passed; a
    // preflight alone claims nothing.
    let mut claimed = None;
    if refusals.is_empty() && !hello.preflight_only {
        match gc::claim(daemon, id, &hello.layers) {
            Ok(dir) => claimed = Some(dir),
            Err(e) => refusals.push(format!("{e:#}")),
        }
    }
    drop(store_lock);
    reply.accepted = refusals.is_empty();
    reply.refusals = refusals;
    Preflight { reply, claimed }
}

/// Bind sources the policy allows by their text that this host cannot
/// give: missing, or resolving through a symlink outside the allowance.
/// Both get one message, so that no answer tells a source whether a path
/// outside the allowance exists; paths outside it are never looked up
/// ([`Policy::check`] refuses them by their text). With
/// `--allow-privileged` every path is allowed, and only existence counts.
fn unusable_bind_sources(policy: &Policy, config: &BundleConfig) -> Vec<String> {
    let mut unusable = Vec::new();
    for source in config.bind_mount_sources() {
        let usable = if policy.privileged() {
            source.exists()
        } else if policy.bind_allowed(&source) {
            resolves_inside(policy, &source)
        } else {
            continue;
        };
        if !usable {
            unusable.push(format!(
                "bind mount source {} does not exist on this host or leads outside the host \
                 paths containers may use ({})",
                source.display(),
                policy.bind_roots_text()
            ));
        }
    }
    unusable
}

fn resolves_inside(policy: &Policy, source: &Path) -> bool {
    std::fs::canonicalize(source).is_ok_and(|real| policy.bind_allowed(&real))
}

/// Whether a lazy restore can work here: userfaultfd with the events CRIU
/// needs, and pipes large enough for its page transfer (raised when they are
/// not, which needs root).
fn lazy_pages(daemon: &Daemon) -> Result<(), String> {
    if !daemon.criu.supports_lazy_pages() {
        return Err("criu check --feature uffd-noncoop fails (no userfaultfd)".into());
    }
    match ensure_pipe_max_size() {
        Ok(PipeMaxSize::Enough(_)) => Ok(()),
        Ok(PipeMaxSize::Raised { from, to }) => {
            tracing::info!(
                from,
                to,
                "raised fs.pipe-max-size: CRIU's lazy page transfer needs it"
            );
            Ok(())
        }
        Err(e) => Err(format!("{e:#}")),
    }
}

fn mem_available() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    parse_mem_available(&meminfo).context("no MemAvailable line in /proc/meminfo")
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

fn free_bytes(daemon: &Daemon) -> nix::Result<u64> {
    let st = nix::sys::statvfs::statvfs(&daemon.state_dir)?;
    Ok(st.blocks_available() * st.fragment_size())
}

#[cfg(test)]
mod tests {
    use super::parse_mem_available;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo =
            "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots\n"), None);
        assert_eq!(
            parse_mem_available("MemAvailable: 18446744073709551615 kB\n"),
            None
        );
    }
}
