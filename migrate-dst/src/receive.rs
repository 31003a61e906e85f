//! Phases 4 and 6 on the destination: accepting data streams, writing each
//! where it belongs, and checking them against the source's manifests.
//!
//! Streams are accepted as they come (several at once); each records its
//! computed digest in the [`Inbox`]. The session then waits for the files a
//! manifest names and compares sizes and checksums. A stream that arrives
//! before its phase, or names a file it should not, fails the migration.
//!
//! Each stream is admitted from its header alone, before anything of it is
//! taken: refused are a kind that is not a data stream (the page tunnel is a
//! bidirectional stream), a layer the preflight did not ask for or one
//! declared larger than the `Hello` announced, a second upper-dir archive or
//! delta, an image of a round already verified, and any stream seen before.
//! What a stream may create is the [`UnpackPolicy`]'s to say.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use migrate_common::protocol::{FileDigest, Hello, StreamKind};
use migrate_common::rootfs::archive::{unpack_delta, unpack_dir, UnpackPolicy};
use migrate_common::rootfs::digest::LayerDigest;
use migrate_common::transfer::probe::MAX_PROBE_BYTES;
use migrate_common::transfer::segments::{self, SegmentMap};
use migrate_common::transfer::{
    self, ByteBudget, DataHeader, Durability, StreamId, TransferError, TransferStats, WriteTurns,
};
use tokio::sync::Notify;

use crate::store::{self, LayerStore};

/// Most pre-dump rounds a migration may send (the source stops far sooner;
/// this only bounds what a confused peer can make us create).
pub const MAX_ROUNDS: u32 = 64;

/// Where the streams of the current phase may go.
#[derive(Debug, Default)]
pub struct Targets {
    /// Layers the preflight asked for.
    pub layers: HashSet<String>,
    /// The dir holding every dump's image dir; set once the checkpoint
    /// phase begins.
    pub images: Option<PathBuf>,
    pub upper: Option<PathBuf>,
}

/// What the streams of one migration may take of this host: images go to
/// the image dir (a tmpfs), layers and the upper dir to the state dir's
/// disk, each bounded by what its preflight item measured free.
#[derive(Debug, Clone)]
pub struct Budgets {
    pub disk: Arc<ByteBudget>,
    pub images: Arc<ByteBudget>,
}

impl Budgets {
    /// The budget a stream of `kind` is charged to.
    pub fn of(&self, kind: StreamKind) -> &Arc<ByteBudget> {
        match kind {
            StreamKind::Image => &self.images,
            StreamKind::Layer
            | StreamKind::UpperDir
            | StreamKind::UpperDelta
            | StreamKind::PageTunnel
            | StreamKind::Invalid => &self.disk,
            // Never charged: it takes nothing of this host but a bounded
            // read (see `receive_one`).
            StreamKind::Probe => &self.disk,
        }
    }
}

/// What the data streams of one migration delivered, and what they may.
#[derive(Debug)]
pub struct Inbox {
    ledger: Mutex<Ledger>,
    changed: Notify,
    pub targets: Mutex<Targets>,
    /// The size the `Hello` announced for each layer, by digest: the most a
    /// layer's stream may declare (the source measures a layer the same way
    /// both times, and layers do not change).
    announced_layers: HashMap<String, u64>,
    policy: UnpackPolicy,
    /// The segments of one image file write it in turns.
    write_turns: WriteTurns,
}

#[derive(Debug, Default)]
struct Ledger {
    received: HashMap<StreamId, Result<FileDigest, String>>,
    /// Every stream admitted so far; the upper dir and its delta under their
    /// kind alone, so that there is one of each whatever their names say.
    admitted: HashSet<StreamId>,
    /// Dumps whose manifest was verified (pre-dump rounds; 0, the final dump):
    /// no more images of theirs may come.
    sealed_rounds: BTreeSet<u32>,
    /// Streams refused on arrival, with why: any fails the migration.
    refused: Vec<(String, String)>,
    /// The byte ranges of every image file admitted so far (a large one comes
    /// in segments): none may overlap another.
    segments: SegmentMap<StreamId>,
}

impl Inbox {
    /// The inbox of the migration `hello` starts; `policy` says what its
    /// archives may create (the layers' as well as the upper dir's).
    pub fn new(hello: &Hello, policy: UnpackPolicy) -> Self {
        let mut announced_layers = HashMap::new();
        for layer in &hello.layers {
            announced_layers
                .entry(layer.digest.clone())
                .and_modify(|size: &mut u64| *size = (*size).min(layer.size_bytes))
                .or_insert(layer.size_bytes);
        }
        Self {
            ledger: Mutex::default(),
            changed: Notify::new(),
            targets: Mutex::default(),
            announced_layers,
            policy,
            write_turns: WriteTurns::default(),
        }
    }

    fn ledger(&self) -> Result<std::sync::MutexGuard<'_, Ledger>> {
        self.ledger
            .lock()
            .map_err(|_| anyhow!("inbox lock poisoned"))
    }

    /// Whether the stream `header` announces is one this migration expects
    /// now; if so it is admitted, and no stream like it will be again.
    fn admit(&self, header: &DataHeader) -> Result<()> {
        let id = &header.id;
        let key = match id.kind {
            StreamKind::UpperDir | StreamKind::UpperDelta => {
                if id.round != 0 || !id.name.is_empty() {
                    bail!("{id} stream names round {} and {:?}", id.round, id.name);
                }
                StreamId::new(id.kind, 0, "")
            }
            StreamKind::Layer => {
                let wanted = self
                    .targets
                    .lock()
                    .map_err(|_| anyhow!("inbox lock poisoned"))?
                    .layers
                    .contains(&id.name);
                if !wanted || id.round != 0 {
                    bail!("layer {:?} was not asked for", id.name);
                }
                let announced = self.announced_layers.get(&id.name).copied().unwrap_or(0);
                if header.declared_bytes > announced {
                    bail!(
                        "{id} declares {} bytes, more than the {announced} its Hello announced",
                        header.declared_bytes
                    );
                }
                id.clone()
            }
            StreamKind::Image => {
                if id.round > MAX_ROUNDS {
                    bail!(
                        "pre-dump round {} is beyond the limit of {MAX_ROUNDS}",
                        id.round
                    );
                }
                let mut ledger = self.ledger()?;
                if ledger.sealed_rounds.contains(&id.round) {
                    bail!("{id} arrived after its dump was verified");
                }
                ledger
                    .segments
                    .admit(id.clone().at(0), id.offset, header.declared_bytes)?;
                id.clone()
            }
            StreamKind::Probe => {
                if id.round != 0 || !id.name.is_empty() {
                    bail!("{id} stream names round {} and {:?}", id.round, id.name);
                }
                if header.declared_bytes > MAX_PROBE_BYTES {
                    bail!(
                        "a link probe of {} bytes, more than the {MAX_PROBE_BYTES} allowed",
                        header.declared_bytes
                    );
                }
                StreamId::new(id.kind, 0, "")
            }
            StreamKind::PageTunnel | StreamKind::Invalid => {
                bail!(
                    "{:?} is not a data stream this destination accepts",
                    id.kind
                )
            }
        };
        if !self.ledger()?.admitted.insert(key) {
            bail!("{id} was already sent in this migration");
        }
        Ok(())
    }

    /// Waits until stream `id` has been received, and returns whether it
    /// was received well.
    async fn wait_for(&self, id: &StreamId) -> Result<FileDigest> {
        loop {
            let notified = self.changed.notified();
            match self.ledger()?.received.get(id) {
                Some(Ok(digest)) => return Ok(digest.clone()),
                Some(Err(e)) => bail!("{id} failed: {e}"),
                None => {}
            }
            notified.await;
        }
    }

    fn record(&self, id: StreamId, result: Result<FileDigest, String>) {
        if let Ok(mut ledger) = self.ledger() {
            ledger.received.insert(id, result);
        }
        self.changed.notify_waiters();
    }

    fn refuse(&self, stream: String, reason: String) {
        tracing::warn!(stream, reason, "data stream refused");
        if let Ok(mut ledger) = self.ledger() {
            ledger.refused.push((stream, reason));
        }
        self.changed.notify_waiters();
    }

    /// Waits until a data stream has failed or been refused, and says which
    /// and why: the session fails on it at once, while the source may still
    /// be sending, rather than at the next manifest.
    pub async fn failure(&self) -> anyhow::Error {
        loop {
            let notified = self.changed.notified();
            let failure = match self.ledger() {
                Err(e) => Some(e),
                Ok(ledger) => ledger
                    .refused
                    .first()
                    .map(|(stream, reason)| anyhow!("refused {stream}: {reason}"))
                    .or_else(|| {
                        ledger.received.iter().find_map(|(id, result)| {
                            result
                                .as_ref()
                                .err()
                                .map(|e| anyhow!("receiving {id}: {e}"))
                        })
                    }),
            };
            if let Some(failure) = failure {
                return failure;
            }
            notified.await;
        }
    }

    /// Waits until every file of `manifest` has arrived, then checks each
    /// against what was computed on arrival. Once a manifest is verified, no
    /// more images of the dumps it lists are accepted.
    pub async fn verify(&self, manifest: &[FileDigest]) -> Result<()> {
        loop {
            let notified = self.changed.notified();
            {
                let mut ledger = self.ledger()?;
                if let Some((stream, reason)) = ledger.refused.first() {
                    bail!("refused {stream}: {reason}");
                }
                let mut missing = false;
                for expected in manifest {
                    let id = StreamId::of(expected);
                    match ledger.received.get(&id) {
                        None => missing = true,
                        Some(Err(e)) => bail!("receiving {id}: {e}"),
                        Some(Ok(got)) if got.raw_bytes != expected.raw_bytes || got.blake3 != expected.blake3 => bail!(
                            "{id} is corrupt: got {} bytes with blake3 {}, the source sent {} bytes with blake3 {}",
                            got.raw_bytes,
                            got.blake3,
                            expected.raw_bytes,
                            expected.blake3
                        ),
                        Some(Ok(_)) => {}
                    }
                }
                // A failed stream the manifest does not name still fails the
                // migration: something was sent that should not have been.
                if let Some((id, Err(e))) = ledger.received.iter().find(|(_, r)| r.is_err()) {
                    bail!("receiving {id}: {e}");
                }
                if !missing {
                    check_segments(manifest, &ledger.received)?;
                    let images = manifest
                        .iter()
                        .filter(|file| file.kind == StreamKind::Image as i32);
                    ledger.sealed_rounds.extend(images.map(|file| file.round));
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

/// Checks that the image segments `manifest` lists make whole files, and
/// that no segment of its dumps arrived that it does not list (it would have
/// written into one of their files).
fn check_segments(
    manifest: &[FileDigest],
    received: &HashMap<StreamId, Result<FileDigest, String>>,
) -> Result<()> {
    let listed: HashSet<StreamId> = manifest.iter().map(StreamId::of).collect();
    let mut files: HashMap<StreamId, Vec<(u64, u64)>> = HashMap::new();
    for id in listed.iter().filter(|id| id.kind == StreamKind::Image) {
        let got = match received.get(id) {
            Some(Ok(got)) => got.raw_bytes,
            _ => bail!("{id} is listed but was not received"),
        };
        files
            .entry(id.clone().at(0))
            .or_default()
            .push((id.offset, got));
    }
    for (file, segments) in &mut files {
        segments::check_coverage(&file.to_string(), segments)?;
    }
    if let Some(extra) = received.keys().find(|id| {
        id.kind == StreamKind::Image
            && files.contains_key(&(*id).clone().at(0))
            && !listed.contains(id)
    }) {
        bail!("{extra} arrived, but the manifest of its dump does not list it");
    }
    Ok(())
}

/// Accepts data streams until the connection closes, then waits for the
/// streams under way to end, so that once this returns nothing writes into
/// the migration's directories any more.
pub async fn accept_streams(
    conn: quinn::Connection,
    inbox: Arc<Inbox>,
    store: Arc<LayerStore>,
    budgets: Budgets,
    stats: Arc<TransferStats>,
) {
    let mut streams = tokio::task::JoinSet::new();
    while let Ok(mut recv) = conn.accept_uni().await {
        while streams.try_join_next().is_some() {}
        let inbox = inbox.clone();
        let store = store.clone();
        let budgets = budgets.clone();
        let stats = stats.clone();
        streams.spawn(async move {
            let header = match transfer::read_header(&mut recv).await {
                Ok(header) => header,
                Err(e) => {
                    inbox.refuse("a data stream".into(), format!("{e:#}"));
                    return;
                }
            };
            if let Err(e) = inbox.admit(&header) {
                let _ = recv.stop(0u32.into());
                inbox.refuse(header.id.to_string(), format!("{e:#}"));
                return;
            }
            let budget = budgets.of(header.id.kind).clone();
            let result = receive_one(recv, &header, &inbox, &store, budget, stats)
                .await
                .map_err(|e| format!("{e:#}"));
            if let Err(e) = &result {
                tracing::warn!(stream = %header.id, error = %e, "data stream failed");
            }
            inbox.record(header.id, result);
        });
    }
    while streams.join_next().await.is_some() {}
}

async fn receive_one(
    recv: quinn::RecvStream,
    header: &DataHeader,
    inbox: &Inbox,
    store: &LayerStore,
    budget: Arc<ByteBudget>,
    stats: Arc<TransferStats>,
) -> Result<FileDigest> {
    let id = &header.id;
    let (images, upper) = {
        let targets = inbox
            .targets
            .lock()
            .map_err(|_| anyhow!("inbox lock poisoned"))?;
        (targets.images.clone(), targets.upper.clone())
    };
    let policy = inbox.policy.clone();
    match id.kind {
        StreamKind::Layer => {
            let digest = LayerDigest::parse(&id.name)?;
            let incoming = store.incoming_dir(&digest)?;
            let target = incoming.clone();
            let received = transfer::receive_stream(recv, header, budget, stats, move |source| {
                unpack_dir(source, &target, &policy).map_err(TransferError::from)
            })
            .await;
            let digest_of_stream = match received {
                Ok(((), d)) => d,
                Err(e) => {
                    store::discard(&incoming);
                    return Err(e.into());
                }
            };
            store.commit(&incoming, &digest)?;
            Ok(digest_of_stream)
        }
        StreamKind::Image => {
            let images =
                images.ok_or_else(|| anyhow!("{id} arrived before the checkpoint phase"))?;
            let dir = dump_dir(&images, id.round)?;
            let path = image_path(&dir, &id.name)?;
            // Needed only until the restore ends; a crash before then
            // leaves the source its copy.
            Ok(transfer::receive_file(
                recv,
                header,
                &path,
                Durability::Volatile,
                &inbox.write_turns,
                budget,
                stats,
            )
            .await
            .with_context(|| format!("receiving {id}"))?)
        }
        StreamKind::UpperDir => {
            let dir = upper
                .ok_or_else(|| anyhow!("the upper dir arrived before the checkpoint phase"))?;
            let ((), digest) =
                transfer::receive_stream(recv, header, budget, stats, move |source| {
                    unpack_dir(source, &dir, &policy).map_err(TransferError::from)
                })
                .await
                .context("receiving the upper dir")?;
            Ok(digest)
        }
        StreamKind::UpperDelta => {
            let dir = upper.ok_or_else(|| {
                anyhow!("the upper dir's changes arrived before the checkpoint phase")
            })?;
            // The changes apply on top of the whole dir sent before them.
            inbox
                .wait_for(&StreamId::new(StreamKind::UpperDir, 0, ""))
                .await
                .context("the upper dir the changes apply to")?;
            let ((), digest) =
                transfer::receive_stream(recv, header, budget, stats, move |source| {
                    unpack_delta(source, &dir, &policy).map_err(TransferError::from)
                })
                .await
                .context("receiving the upper dir's changes")?;
            Ok(digest)
        }
        StreamKind::Probe => {
            // Its own budget: a probe only measures the link, and must not
            // take room the images need.
            let budget = Arc::new(ByteBudget::new(MAX_PROBE_BYTES));
            let (_, digest) = transfer::receive_stream(recv, header, budget, stats, |source| {
                std::io::copy(source, &mut std::io::sink())
                    .map_err(|e| TransferError::io("reading the link probe", e))
            })
            .await
            .context("receiving the link probe")?;
            Ok(digest)
        }
        // Refused on admission.
        StreamKind::PageTunnel | StreamKind::Invalid => {
            bail!(
                "{:?} is not a data stream this destination accepts",
                id.kind
            )
        }
    }
}

/// The image dir of one dump under `images`, made on first use: `final`
/// for the final dump (round 0), `<n>` for pre-dump round `n`, whose
/// `parent` link names round `n-1` as CRIU expects (CRIU wrote the same link
/// on the source; links do not cross).
pub fn dump_dir(images: &Path, round: u32) -> Result<PathBuf> {
    if round > MAX_ROUNDS {
        bail!("pre-dump round {round} is beyond the limit of {MAX_ROUNDS}");
    }
    let dir = images.join(dump_dir_name(round));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if round > 1 {
        link_parent(&dir, round - 1)?;
    }
    Ok(dir)
}

/// Makes `dir/parent` point at round `parent`'s dir beside it.
pub fn link_parent(dir: &Path, parent: u32) -> Result<()> {
    let link = dir.join("parent");
    let target = Path::new("..").join(dump_dir_name(parent));
    match std::os::unix::fs::symlink(&target, &link) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let existing =
                std::fs::read_link(&link).with_context(|| format!("reading {}", link.display()))?;
            if existing != target {
                bail!(
                    "{} points at {}, not {}",
                    link.display(),
                    existing.display(),
                    target.display()
                );
            }
            Ok(())
        }
        Err(e) => {
            Err(e).with_context(|| format!("linking {} to {}", link.display(), target.display()))
        }
    }
}

fn dump_dir_name(round: u32) -> String {
    match round {
        0 => "final".to_owned(),
        n => n.to_string(),
    }
}

/// The path for an image file, refusing names that are not plain file names
/// (the name comes from the network).
pub fn image_path(dir: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name == "parent"
        || name.contains('/')
        || name.contains('\0')
    {
        bail!("refusing image file name {name:?}");
    }
    Ok(dir.join(name))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
