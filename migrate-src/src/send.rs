//! Phases 4 and 6: bulk data to the destination, several QUIC streams at
//! once: missing lower layers before the freeze, then every CRIU image file
//! and the upper-dir archive while the container is frozen.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use migrate_common::protocol::{FileDigest, StreamKind};
use migrate_common::rootfs::archive::pack_dir;
use migrate_common::transfer::{send_file, send_stream, TransferError, TransferStats};
use tokio::task::JoinSet;

use crate::inspect::Layer;

/// Streams open at once: enough to keep the link busy while one stream's
/// compressor waits, few enough for 2-core hosts.
const PARALLEL_STREAMS: usize = 4;

/// One unit of bulk data.
#[derive(Debug, Clone)]
enum Item {
    File {
        name: String,
        path: PathBuf,
    },
    Tree {
        kind: StreamKind,
        name: String,
        dir: PathBuf,
    },
}

/// Sends the layers the destination asked for.
pub async fn send_layers(
    conn: &quinn::Connection,
    layers: &[Layer],
    missing: &[String],
    stats: &Arc<TransferStats>,
) -> Result<Vec<FileDigest>> {
    let items = layers
        .iter()
        .filter(|l| missing.contains(&l.info.digest))
        .map(|l| Item::Tree {
            kind: StreamKind::Layer,
            name: l.info.digest.clone(),
            dir: l.path.clone(),
        })
        .collect();
    send_all(conn, items, stats).await
}

/// Sends every file of the image dir and the upper dir.
pub async fn send_checkpoint(
    conn: &quinn::Connection,
    image_dir: &Path,
    upper: &Path,
    stats: &Arc<TransferStats>,
) -> Result<Vec<FileDigest>> {
    let mut items = vec![Item::Tree {
        kind: StreamKind::UpperDir,
        name: String::new(),
        dir: upper.to_owned(),
    }];
    let mut images: Vec<(u64, Item)> = Vec::new();
    for entry in
        std::fs::read_dir(image_dir).with_context(|| format!("listing {}", image_dir.display()))?
    {
        let entry = entry?;
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        images.push((
            meta.len(),
            Item::File {
                name,
                path: entry.path(),
            },
        ));
    }
    // Largest first, so the big page files start at once and the small ones
    // fill the gaps.
    images.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    items.extend(images.into_iter().map(|(_, item)| item));
    send_all(conn, items, stats).await
}

async fn send_all(
    conn: &quinn::Connection,
    items: Vec<Item>,
    stats: &Arc<TransferStats>,
) -> Result<Vec<FileDigest>> {
    let mut pending = items.into_iter();
    let mut running = JoinSet::new();
    let mut done = Vec::new();
    loop {
        while running.len() < PARALLEL_STREAMS {
            let Some(item) = pending.next() else { break };
            running.spawn(send_item(conn.clone(), item, stats.clone()));
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        done.push(joined.context("a sending task panicked")??);
    }
    Ok(done)
}

async fn send_item(
    conn: quinn::Connection,
    item: Item,
    stats: Arc<TransferStats>,
) -> Result<FileDigest> {
    match item {
        Item::File { name, path } => {
            send_file(&conn, StreamKind::Image, &name, path.clone(), stats)
                .await
                .with_context(|| format!("sending image {}", path.display()))
        }
        Item::Tree { kind, name, dir } => {
            let what = dir.display().to_string();
            send_stream(&conn, kind, &name, stats, move |sink| {
                pack_dir(&dir, sink).map_err(TransferError::from)?;
                Ok(())
            })
            .await
            .with_context(|| format!("sending {what}"))
        }
    }
}
