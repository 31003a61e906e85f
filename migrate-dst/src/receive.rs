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
use migrate_common::rootfs::archive::unpack_dir;
use migrate_common::rootfs::digest::LayerDigest;
use migrate_common::transfer::{self, ByteBudget, TransferError, TransferStats};
use tokio::sync::Notify;

use crate::store::{self, LayerStore};

/// Where the streams of the current phase may go.
#[derive(Debug, Default)]
pub struct Targets {
    /// Layers the preflight asked for.
    pub layers: HashSet<String>,
    /// Set once the checkpoint phase begins.
    pub images: Option<PathBuf>,
    pub upper: Option<PathBuf>,
}

type Key = (StreamKind, String);

#[derive(Debug, Default)]
pub struct Inbox {
    received: Mutex<HashMap<Key, Result<FileDigest, String>>>,
    changed: Notify,
    pub targets: Mutex<Targets>,
}

impl Inbox {
    fn record(&self, key: Key, result: Result<FileDigest, String>) {
        if let Ok(mut received) = self.received.lock() {
            received.insert(key, result);
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
                    let kind = StreamKind::try_from(expected.kind).unwrap_or(StreamKind::Invalid);
                    match received.get(&(kind, expected.name.clone())) {
                        None => missing = true,
                        Some(Err(e)) => bail!("receiving {kind:?} {:?}: {e}", expected.name),
                        Some(Ok(got)) if got.raw_bytes != expected.raw_bytes || got.blake3 != expected.blake3 => bail!(
                            "{kind:?} {:?} is corrupt: got {} bytes with blake3 {}, the source sent {} bytes with blake3 {}",
                            expected.name,
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
                if let Some(((kind, name), Err(e))) = received.iter().find(|(_, r)| r.is_err()) {
                    bail!("receiving {kind:?} {name:?}: {e}");
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
            let (kind, name) = match transfer::read_header(&mut recv).await {
                Ok(header) => header,
                Err(e) => {
                    inbox.record((StreamKind::Invalid, String::new()), Err(format!("{e:#}")));
                    return;
                }
            };
            let result = receive_one(recv, kind, &name, &inbox, &store, budget, stats)
                .await
                .map_err(|e| format!("{e:#}"));
            if let Err(e) = &result {
                tracing::warn!(?kind, name, error = %e, "data stream failed");
            }
            inbox.record((kind, name), result);
        });
    }
    while streams.join_next().await.is_some() {}
}

async fn receive_one(
    recv: quinn::RecvStream,
    kind: StreamKind,
    name: &str,
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
            targets.layers.contains(name),
            targets.images.clone(),
            targets.upper.clone(),
        )
    };
    match kind {
        StreamKind::Layer => {
            if !layer_wanted {
                bail!("layer {name:?} was not asked for");
            }
            let digest = LayerDigest::parse(name)?;
            let incoming = store.incoming_dir(&digest)?;
            let target = incoming.clone();
            let received =
                transfer::receive_stream(recv, kind, name, budget, stats, move |source| {
                    unpack_dir(source, &target).map_err(TransferError::from)
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
            let dir = images
                .ok_or_else(|| anyhow!("image {name:?} arrived before the checkpoint phase"))?;
            let path = image_path(&dir, name)?;
            Ok(
                transfer::receive_file(recv, kind, name, &path, budget, stats)
                    .await
                    .with_context(|| format!("receiving image {name}"))?,
            )
        }
        StreamKind::UpperDir => {
            let dir = upper
                .ok_or_else(|| anyhow!("the upper dir arrived before the checkpoint phase"))?;
            let ((), digest) =
                transfer::receive_stream(recv, kind, name, budget, stats, move |source| {
                    unpack_dir(source, &dir).map_err(TransferError::from)
                })
                .await
                .context("receiving the upper dir")?;
            Ok(digest)
        }
        StreamKind::Invalid => bail!("stream of invalid kind"),
    }
}

/// The path for an image file, refusing names that are not plain file names
/// (the name comes from the network).
pub fn image_path(dir: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        bail!("refusing image file name {name:?}");
    }
    Ok(dir.join(name))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn digest(kind: StreamKind, name: &str, bytes: u64, hash: &str) -> FileDigest {
        FileDigest {
            kind: kind as i32,
            name: name.into(),
            raw_bytes: bytes,
            blake3: hash.into(),
        }
    }

    #[test]
    fn image_names_must_be_plain() {
        let dir = Path::new("/s/images");
        assert_eq!(
            image_path(dir, "pages-1.img").unwrap(),
            dir.join("pages-1.img")
        );
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd"] {
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
        inbox.record((StreamKind::Image, "a.img".into()), Ok(manifest[0].clone()));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        inbox.record(
            (StreamKind::UpperDir, String::new()),
            Ok(manifest[1].clone()),
        );
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn verify_reports_corruption_and_failed_streams() {
        let inbox = Inbox::default();
        let sent = digest(StreamKind::Image, "a.img", 3, "aa");
        inbox.record(
            (StreamKind::Image, "a.img".into()),
            Ok(digest(StreamKind::Image, "a.img", 3, "ab")),
        );
        let err = inbox.verify(std::slice::from_ref(&sent)).await.unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");

        let inbox = Inbox::default();
        inbox.record((StreamKind::Image, "a.img".into()), Ok(sent.clone()));
        inbox.record((StreamKind::Image, "evil".into()), Err("refused".into()));
        let err = inbox.verify(&[sent]).await.unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
