//! Phases 2 and 3 on the destination. [`admit`]: may this source push
//! containers here at all (`--allow`)? Checked on a connection's first
//! message, before anything else; a refused source hears why and nothing
//! about this host. [`run`]: can this host take the container, and does the
//! destination's policy let it do what its config asks (`--allow-bind`,
//! `--allow-privileged`)? Every check runs, so the source hears all the
//! reasons at once, and each leaves an item in the reply, passed or not,
//! which `migrate check` prints; none of them changes anything but the
//! claim on the container's id. The checks that read this host are in
//! [`checks`].

use std::path::Path;

use anyhow::{Context, Result};
use indicatif::HumanBytes;
use migrate_common::bundle::BundleConfig;
use migrate_common::criu::MIN_VERSION;
use migrate_common::protocol::{
    read_frame_within, write_frame, Body, ControlChannel, ControlMessage, Failed, Hello,
    MemoryMode, PreflightReply, MAX_CPUINFO_BYTES, PROTOCOL_VERSION,
};
use migrate_common::rootfs::digest::LayerDigest;
use migrate_common::runc::CriuOptions;
use migrate_common::transport;

use crate::gc;
use crate::network;
use crate::restore::ContainerDir;
use crate::session::Control;
use crate::Daemon;

mod checks;
mod room;

use checks::Verdict;
use room::{room, Needs};

/// A source the destination's `--allow` list does not name; the message is
/// the one the source was sent.
#[derive(Debug, thiserror::Error)]
#[error("refused a source: {0}")]
pub struct SourceRefused(String);

/// The verdict, and on acceptance the claimed container dir.
#[derive(Debug)]
pub struct Preflight {
    pub reply: PreflightReply,
    pub claimed: Option<ContainerDir>,
    /// Free bytes in the image dir, as measured (the reply's `free_bytes`
    /// is the state dir's).
    pub image_free_bytes: u64,
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

// The items' names, in the order they run.
const PROTOCOL: &str = "protocol";
const CONTAINER_ID: &str = "container id";
const CRIU_VERSION: &str = "criu version";
const CRIU_FEATURES: &str = "criu features";
const CRIU_OPTIONS: &str = "criu options";
const CPU: &str = "cpu";
const RUNC: &str = "runc";
const EXISTING: &str = "existing container";
const POLICY: &str = "policy";
const BIND_SOURCES: &str = "bind sources";
const CGROUP: &str = "cgroup";
const NETWORK: &str = "network";
const LAYERS: &str = "layers";
const DISK: &str = "disk";
const IMAGE_SPACE: &str = "image space";
const MEMORY: &str = "memory";
const CLAIM: &str = "claim";

/// Runs every check, each leaving an item in the reply; a check that
/// depends on one that failed (the container's runc state on a valid id,
/// CRIU's features on a usable CRIU, bind sources and cgroup on a readable
/// config) does not run and leaves none.
pub fn run(daemon: &Daemon, hello: &Hello) -> Preflight {
    let mut verdict = Verdict::default();
    let mut reply = PreflightReply {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..Default::default()
    };

    if hello.protocol_version == PROTOCOL_VERSION {
        verdict.pass(PROTOCOL, format!("version {PROTOCOL_VERSION}"));
    } else {
        verdict.fail(
            PROTOCOL,
            format!(
                "protocol version {} is not this destination's {PROTOCOL_VERSION}: upgrade the \
                 older side",
                hello.protocol_version
            ),
        );
    }
    let id = hello.container_id.as_str();
    let id_ok = migrate_common::valid_container_id(id);
    if id_ok {
        verdict.pass(CONTAINER_ID, format!("{id} is a valid container id"));
    } else {
        verdict.fail(CONTAINER_ID, format!("{id:?} is not a valid container id"));
    }

    let criu_usable = match daemon.criu.version() {
        Ok(v) => {
            reply.criu_version = v.to_string();
            if v < MIN_VERSION {
                verdict.fail(
                    CRIU_VERSION,
                    format!("CRIU {v} is older than {MIN_VERSION}, which restore here needs"),
                );
            } else {
                verdict.pass(CRIU_VERSION, format!("CRIU {v} (at least {MIN_VERSION})"));
            }
            true
        }
        Err(e) => {
            verdict.fail(CRIU_VERSION, format!("CRIU is not usable: {e}"));
            false
        }
    };
    if let Some(outcome) = criu_features(daemon, hello, criu_usable, &mut reply) {
        verdict.record(CRIU_FEATURES, outcome);
    }
    match CriuOptions::from_names(hello.tcp_established, &hello.criu_options) {
        Ok(options) if options.names().is_empty() && !options.tcp_established => {
            verdict.pass(CRIU_OPTIONS, "none beyond the defaults")
        }
        Ok(options) => {
            let mut names = options.names();
            if options.tcp_established {
                names.insert(0, "tcp-established".into());
            }
            verdict.pass(CRIU_OPTIONS, format!("known here: {}", names.join(", ")))
        }
        Err(e) => verdict.fail(CRIU_OPTIONS, e.to_string()),
    }
    if let Some(outcome) = cpu(daemon, hello, criu_usable) {
        verdict.record(CPU, outcome);
    }
    match daemon.runc.version() {
        Ok(v) => {
            verdict.pass(RUNC, v.clone());
            reply.runc_version = v;
        }
        Err(e) => verdict.fail(RUNC, format!("runc is not usable: {e}")),
    }
    if id_ok {
        if daemon.runc.exists(id) {
            verdict.fail(
                EXISTING,
                format!(
                    "a container named {id} already exists in runc root {}",
                    daemon.runc.root.display()
                ),
            );
        } else {
            verdict.pass(
                EXISTING,
                format!(
                    "none named {id} in runc root {}",
                    daemon.runc.root.display()
                ),
            );
        }
    }

    match BundleConfig::parse(&hello.config_json) {
        Ok(config) => {
            let violations: Vec<String> = daemon
                .policy
                .check(&config)
                .iter()
                .map(ToString::to_string)
                .collect();
            verdict.record(
                POLICY,
                reasons_or(violations, || {
                    "the config asks for nothing beyond this destination's policy".into()
                }),
            );
            verdict.record(
                BIND_SOURCES,
                reasons_or(
                    checks::unusable_bind_sources(&daemon.policy, &config),
                    || checks::bind_sources_found(&daemon.policy, &config),
                ),
            );
            verdict.record(CGROUP, cgroup(daemon, &config, id).map_err(|r| vec![r]));
            if config.has_private_netns() {
                if let Some(outcome) = network::preflight(&daemon.policy, hello.network.as_ref()) {
                    verdict.record(NETWORK, outcome);
                }
            } else if hello.network.is_some() {
                verdict.fail(
                    NETWORK,
                    "a network identity came for a container that joins a network namespace: \
                     only a namespace of its own is recreated",
                );
            }
        }
        Err(e) => verdict.fail(
            POLICY,
            format!("the container's config.json: {:#}", anyhow::Error::from(e)),
        ),
    }

    // Held from the first layer found here until the claimed dir names its
    // layers: a garbage collection, which takes it exclusively, cannot
    // remove a layer this preflight tells the source not to send (see
    // `crate::gc`).
    let mut bad_digests = Vec::new();
    let store_lock = daemon.store.lock_shared();
    if let Err(e) = &store_lock {
        bad_digests.push(format!("{e:#}"));
    }
    let mut missing_bytes = Some(0u64);
    for layer in &hello.layers {
        match LayerDigest::parse(&layer.digest) {
            Ok(digest) if daemon.store.has(&digest) => {}
            Ok(_) => {
                reply.missing_layers.push(layer.digest.clone());
                missing_bytes = missing_bytes.and_then(|sum| sum.checked_add(layer.size_bytes));
            }
            Err(e) => bad_digests.push(format!("layer digest {:?}: {e}", layer.digest)),
        }
    }
    let missing_bytes = missing_bytes.unwrap_or(u64::MAX);
    verdict.record(
        LAYERS,
        reasons_or(bad_digests, || match reply.missing_layers.len() {
            0 => format!("all {} in the store here", hello.layers.len()),
            n => format!(
                "{n} of {} missing here ({}), {} to send",
                hello.layers.len(),
                reply
                    .missing_layers
                    .iter()
                    .map(|d| short_digest(d))
                    .collect::<Vec<_>>()
                    .join(", "),
                HumanBytes(missing_bytes)
            ),
        }),
    );
    let needs = Needs::of(hello, missing_bytes);
    let disk = checks::free_bytes(&daemon.state_dir);
    reply.free_bytes = *disk.as_ref().unwrap_or(&0);
    verdict.record(
        DISK,
        room(
            disk,
            needs.disk,
            &daemon.state_dir,
            "layers and the upper dir",
        ),
    );
    let images = daemon.images.free_bytes();
    let image_free_bytes = *images.as_ref().unwrap_or(&0);
    reply.image_free_bytes = image_free_bytes;
    verdict.record(
        IMAGE_SPACE,
        room(images, needs.images, daemon.images.root(), "images"),
    );

    match checks::mem_available() {
        Ok(available) => {
            reply.mem_available_bytes = available;
            let room = format!(
                "the container uses {} of memory, its images in the image dir's tmpfs {} more \
                 until the restore ends, and this host has {} available",
                HumanBytes(hello.memory_bytes),
                HumanBytes(needs.images_in_memory),
                HumanBytes(available)
            );
            if needs.memory > available {
                verdict.fail(MEMORY, room);
            } else {
                verdict.pass(MEMORY, room);
            }
        }
        Err(e) => verdict.fail(
            MEMORY,
            format!("cannot read this host's available memory: {e:#}"),
        ),
    }

    // Claiming the directory is the lock against a second migration of the
    // same id, so it comes last, and only when everything else passed; a
    // preflight alone claims nothing.
    let mut claimed = None;
    if verdict.accepted() && !hello.preflight_only {
        match gc::claim(daemon, id, &hello.layers) {
            Ok(dir) => {
                verdict.pass(CLAIM, format!("{} is this migration's", dir.root.display()));
                claimed = Some(dir);
            }
            Err(e) => verdict.fail(CLAIM, format!("{e:#}")),
        }
    }
    drop(store_lock);
    reply.accepted = verdict.accepted();
    (reply.checks, reply.refusals) = verdict.into_parts();
    Preflight {
        reply,
        claimed,
        image_free_bytes,
    }
}

/// A layer digest as people compare them: its first hex digits.
fn short_digest(digest: &str) -> &str {
    let end = digest
        .char_indices()
        .nth("b3:".len() + 12)
        .map_or(digest.len(), |(at, _)| at);
    &digest[..end]
}

/// Passed with `detail()` when nothing is wrong, else failed for every
/// reason.
fn reasons_or(
    reasons: Vec<String>,
    detail: impl FnOnce() -> String,
) -> Result<String, Vec<String>> {
    if reasons.is_empty() {
        Ok(detail())
    } else {
        Err(reasons)
    }
}

/// `criu check`, and lazy pages for a lazy mode; `None` when CRIU is not
/// usable and the mode is known, as nothing could be checked. An unknown
/// mode is said even then.
fn criu_features(
    daemon: &Daemon,
    hello: &Hello,
    criu_usable: bool,
    reply: &mut PreflightReply,
) -> Option<Result<String, Vec<String>>> {
    let mut reasons = Vec::new();
    let mode = MemoryMode::try_from(hello.mode)
        .ok()
        .filter(|m| *m != MemoryMode::Invalid);
    if mode.is_none() {
        reasons.push(format!(
            "memory mode {} is not one this destination knows",
            hello.mode
        ));
    }
    if !criu_usable {
        return (!reasons.is_empty()).then_some(Err(reasons));
    }
    if let Err(e) = daemon.criu.check() {
        reasons.push(e.to_string());
    }
    let mut detail = "criu check passes".to_owned();
    if let Some(mode) = mode.filter(|m| m.is_lazy()) {
        match checks::lazy_pages(daemon) {
            Ok(()) => {
                reply.lazy_pages = true;
                detail.push_str(&format!(", and lazy pages work, which {mode:?} needs"));
            }
            Err(problem) => {
                reasons.push(format!(
                    "this host cannot restore with lazy pages, which {mode:?} needs: {problem}"
                ));
                reply.lazy_pages_problem = problem;
            }
        }
    }
    Some(reasons_or(reasons, || detail))
}

/// `criu cpuinfo check` of the source's image: can processes dumped on its
/// CPU run on this one? `None` when CRIU is not usable to check an image.
fn cpu(daemon: &Daemon, hello: &Hello, criu_usable: bool) -> Option<Result<String, Vec<String>>> {
    if hello.cpuinfo.is_empty() {
        return Some(Ok("not checked (the source sent no cpuinfo image)".into()));
    }
    if hello.cpuinfo.len() > MAX_CPUINFO_BYTES {
        return Some(Err(vec![format!(
            "the source's cpuinfo image is {} bytes, more than the {MAX_CPUINFO_BYTES} a \
             destination takes",
            hello.cpuinfo.len()
        )]));
    }
    if !criu_usable {
        return None;
    }
    Some(match daemon.criu.cpuinfo_check(&hello.cpuinfo) {
        Ok(()) => Ok("criu cpuinfo check accepts the source's CPU".into()),
        Err(e) => Err(vec![e.to_string()]),
    })
}

/// Whether runc can create the container's cgroup here.
fn cgroup(daemon: &Daemon, config: &BundleConfig, id: &str) -> Result<String, String> {
    match checks::container_cgroup(daemon.cgroup_parent.as_deref(), config, id)? {
        Some(cgroup) => checks::cgroup_setup(
            Path::new(checks::CGROUP_ROOT),
            &cgroup,
            &checks::needed_controllers(config),
        ),
        None => Ok("not checked: the systemd cgroup driver places the container".into()),
    }
}
