//! Phases 4 and 6 on the destination: accepting data streams, writing each
//! where it belongs, and checking them against the source's manifests.
//!
//! Streams are accepted as they come (several at once); each records its
//! computed digest in the [`Inbox`]. The session then waits for the files a
//! manifest names and compares sizes and checksums. A stream that arrives
//! before its phase, or names a file it should not, fails the migration.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use migrate_common::protocol::{FileDigest, StreamKind};
use migrate_common::rootfs::archive::{unpack_delta, unpack_dir, UnpackPolicy};
use migrate_common::rootfs::digest::LayerDigest;
use migrate_common::transfer::{self, ByteBudget, StreamId, TransferError, TransferStats};
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

#[derive(Debug, Default)]
pub struct Inbox {
    received: Mutex<HashMap<StreamId, Result<FileDigest, String>>>,
    changed: Notify,
    pub targets: Mutex<Targets>,
}

impl Inbox {
    /// Waits until stream `id` has been received, and returns whether it
    /// was received well.
    async fn wait_for(&self, id: &StreamId) -> Result<FileDigest> {
        loop {
            let notified = self.changed.notified();
            {
                let received = self
                    .received
                    .lock()
                    .map_err(|_| anyhow!("inbox lock poisoned"))?;
                match received.get(id) {
                    Some(Ok(digest)) => return Ok(digest.clone()),
                    Some(Err(e)) => bail!("{id} failed: {e}"),
                    None => {}
                }
            }
            notified.await;
        }
    }

    fn record(&self, id: StreamId, result: Result<FileDigest, String>) {
        if let Ok(mut received) = self.received.lock() {
            received.insert(id, result);
        }
        self.changed.notify_waiters();
    }

    /// Waits until every file of `manifest` has arrived, then checks each
    /// against what was computed on arrival.
    pub async fn verify(&self, manifest: &[FileDigest]) -> Result<()> {
        loop {
            let notified = self.changed.notified();
            {
                let received = self
                    .received
                    .lock()
                    .map_err(|_| anyhow!("inbox lock poisoned"))?;
                let mut missing = false;
                for expected in manifest {
                    let id = StreamId::of(expected);
                    match received.get(&id) {
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
                if let Some((id, Err(e))) = received.iter().find(|(_, r)| r.is_err()) {
                    bail!("receiving {id}: {e}");
                }
                if !missing {
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

/// Accepts data streams until the connection closes, then waits for the
/// streams under way to end, so that once this returns nothing writes into
/// the migration's directories any more.
pub async fn accept_streams(
    conn: quinn::Connection,
    inbox: Arc<Inbox>,
    store: Arc<LayerStore>,
    budget: Arc<ByteBudget>,
    stats: Arc<TransferStats>,
) {
    let mut streams = tokio::task::JoinSet::new();
    while let Ok(mut recv) = conn.accept_uni().await {
        while streams.try_join_next().is_some() {}
        let inbox = inbox.clone();
        let store = store.clone();
        let budget = budget.clone();
        let stats = stats.clone();
        streams.spawn(async move {
            let id = match transfer::read_header(&mut recv).await {
                Ok(id) => id,
                Err(e) => {
                    inbox.record(
                        StreamId::new(StreamKind::Invalid, 0, ""),
                        Err(format!("{e:#}")),
                    );
                    return;
                }
            };
            let result = receive_one(recv, &id, &inbox, &store, budget, stats)
                .await
                .map_err(|e| format!("{e:#}"));
            if let Err(e) = &result {
                tracing::warn!(stream = %id, error = %e, "data stream failed");
            }
            inbox.record(id, result);
        });
    }
    while streams.join_next().await.is_some() {}
}

async fn receive_one(
    recv: quinn::RecvStream,
    id: &StreamId,
    inbox: &Inbox,
    store: &LayerStore,
    budget: Arc<ByteBudget>,
    stats: Arc<TransferStats>,
) -> Result<FileDigest> {
    let (layer_wanted, images, upper) = {
        let targets = inbox
            .targets
            .lock()
            .map_err(|_| anyhow!("inbox lock poisoned"))?;
        (
            targets.layers.contains(&id.name),
            targets.images.clone(),
            targets.upper.clone(),
        )
    };
    match id.kind {
        StreamKind::Layer => {
            if !layer_wanted {
                bail!("layer {:?} was not asked for", id.name);
            }
            let digest = LayerDigest::parse(&id.name)?;
            let incoming = store.incoming_dir(&digest)?;
            let target = incoming.clone();
            let received = transfer::receive_stream(recv, id, budget, stats, move |source| {
                unpack_dir(source, &target, &UnpackPolicy::strict()).map_err(TransferError::from)
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
            Ok(transfer::receive_file(recv, id, &path, budget, stats)
                .await
                .with_context(|| format!("receiving {id}"))?)
        }
        StreamKind::UpperDir => {
            let dir = upper
                .ok_or_else(|| anyhow!("the upper dir arrived before the checkpoint phase"))?;
            let ((), digest) = transfer::receive_stream(recv, id, budget, stats, move |source| {
                unpack_dir(source, &dir, &UnpackPolicy::strict()).map_err(TransferError::from)
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
            let ((), digest) = transfer::receive_stream(recv, id, budget, stats, move |source| {
                unpack_delta(source, &dir, &UnpackPolicy::strict()).map_err(TransferError::from)
            })
            .await
            .context("receiving the upper dir's changes")?;
            Ok(digest)
        }
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
mod tests {
    use super::*;

    fn digest(kind: StreamKind, name: &str, bytes: u64, hash: &str) -> FileDigest {
        StreamId::new(kind, 0, name).digest(bytes, hash.into())
    }

    #[test]
    fn rounds_get_dirs_linked_to_their_parents() {
        let images = tempfile::tempdir().unwrap();
        let first = dump_dir(images.path(), 1).unwrap();
        assert!(!first.join("parent").exists());
        let second = dump_dir(images.path(), 2).unwrap();
        assert_eq!(
            std::fs::read_link(second.join("parent")).unwrap(),
            Path::new("../1")
        );
        assert!(second.join("parent").is_dir());
        // Asking again (parallel streams of one round) is fine.
        dump_dir(images.path(), 2).unwrap();
        let last = dump_dir(images.path(), 0).unwrap();
        assert_eq!(last, images.path().join("final"));
        link_parent(&last, 2).unwrap();
        assert_eq!(
            std::fs::read_link(last.join("parent")).unwrap(),
            Path::new("../2")
        );
        assert!(
            link_parent(&last, 1).is_err(),
            "a different parent is refused"
        );
        assert!(dump_dir(images.path(), MAX_ROUNDS + 1).is_err());
    }

    #[test]
    fn image_names_must_be_plain() {
        let dir = Path::new("/s/images");
        assert_eq!(
            image_path(dir, "pages-1.img").unwrap(),
            dir.join("pages-1.img")
        );
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd", "parent"] {
            assert!(image_path(dir, bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn verify_waits_for_every_file_and_compares() {
        let inbox = Arc::new(Inbox::default());
        let manifest = vec![
            digest(StreamKind::Image, "a.img", 3, "aa"),
            digest(StreamKind::UpperDir, "", 9, "bb"),
        ];
        let waiter = {
            let inbox = inbox.clone();
            let manifest = manifest.clone();
            tokio::spawn(async move { inbox.verify(&manifest).await })
        };
        inbox.record(StreamId::of(&manifest[0]), Ok(manifest[0].clone()));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        inbox.record(StreamId::of(&manifest[1]), Ok(manifest[1].clone()));
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn verify_reports_corruption_and_failed_streams() {
        let inbox = Inbox::default();
        let sent = digest(StreamKind::Image, "a.img", 3, "aa");
        inbox.record(
            StreamId::of(&sent),
            Ok(digest(StreamKind::Image, "a.img", 3, "ab")),
        );
        let err = inbox.verify(std::slice::from_ref(&sent)).await.unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");

        let inbox = Inbox::default();
        inbox.record(StreamId::of(&sent), Ok(sent.clone()));
        inbox.record(
            StreamId::new(StreamKind::Image, 0, "evil"),
            Err("refused".into()),
        );
        let err = inbox.verify(&[sent]).await.unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
