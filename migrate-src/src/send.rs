//! Bulk data to the destination, several QUIC streams at once: missing
//! lower layers, the upper dir and pre-dump rounds while the container runs,
//! then the final dump's image files and what changed in the upper dir since
//! while it is frozen.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use migrate_common::protocol::{FileDigest, StreamKind};
use migrate_common::rootfs::archive::{measure_dir, pack_dir, pack_dir_within, DeltaPlan};
use migrate_common::rootfs::snapshot::TreeSnapshot;
use migrate_common::transfer::segments;
use migrate_common::transfer::{send_segment, send_stream, Outbound, StreamId};
use tokio::task::JoinSet;

use crate::follow::{is_page_file, PageFollower};
use crate::inspect::Layer;

/// Streams of large files open at once: enough to keep the link busy while
/// one stream's compressor waits, few enough for 2-core hosts.
const PARALLEL_LARGE: usize = 4;
/// Streams open at once in all: a dump has dozens of small image files,
/// whose cost is a round trip each rather than bytes, and the frozen step
/// waits for the last of them.
const PARALLEL_STREAMS: usize = 16;
/// Files below this size count as small.
const SMALL_FILE: u64 = 1 << 20;
/// Room beyond a 16th declared for the upper dir's base, packed while the
/// container runs and may grow.
const UPPER_GROWTH_ROOM: u64 = 16 << 20;

/// One unit of bulk data.
#[derive(Debug, Clone)]
enum Item {
    /// Bytes `id.offset..id.offset + len` of an image file: a whole one, or
    /// a segment of a large one.
    Segment {
        id: StreamId,
        path: PathBuf,
        len: u64,
    },
    Tree {
        id: StreamId,
        dir: PathBuf,
    },
}

impl Item {
    fn is_large(&self) -> bool {
        match self {
            Item::Segment { len, .. } => *len >= SMALL_FILE,
            Item::Tree { .. } => true,
        }
    }
}

/// Sends the layers the destination asked for.
pub async fn send_layers(
    conn: &quinn::Connection,
    layers: &[Layer],
    missing: &[String],
    out: &Outbound,
) -> Result<Vec<FileDigest>> {
    let items = layers
        .iter()
        .filter(|l| missing.contains(&l.info.digest))
        .map(|l| Item::Tree {
            id: StreamId::new(StreamKind::Layer, 0, l.info.digest.clone()),
            dir: l.path.clone(),
        })
        .collect();
    send_all(conn, items, out).await
}

/// Sends every image file of one dump: round `round` of pre-copy, or 0 for
/// the final dump.
pub async fn send_images(
    conn: &quinn::Connection,
    dir: &Path,
    round: u32,
    out: &Outbound,
) -> Result<Vec<FileDigest>> {
    send_all(conn, image_items(dir, round, |_| false)?, out).await
}

/// Sends the upper dir while the container runs; returns its manifest entry
/// and what was packed, for the delta.
pub async fn send_upper_base(
    conn: &quinn::Connection,
    upper: &Path,
    out: &Outbound,
) -> Result<(FileDigest, TreeSnapshot)> {
    let dir = upper.to_owned();
    let (snapshot, digest) = send_stream(
        conn,
        &StreamId::new(StreamKind::UpperDir, 0, ""),
        out,
        move |sink| {
            // The container runs: room for what it adds meanwhile. What still
            // does not fit is left out of the base and sent with the delta.
            let measured = measure_dir(&dir)?;
            let declared = measured.saturating_add(measured / 16 + UPPER_GROWTH_ROOM);
            sink.declare(declared)?;
            let (_, snapshot) = pack_dir_within(&dir, sink, declared)?;
            Ok(snapshot)
        },
    )
    .await
    .with_context(|| format!("sending {}", upper.display()))?;
    Ok((digest, snapshot))
}

/// Sends the final dump's image files and, with the container frozen, what
/// changed in the upper dir since `base` was packed. A `follower` has sent
/// the page files as CRIU wrote them, and sends their rest meanwhile.
pub async fn send_checkpoint(
    conn: &quinn::Connection,
    image_dir: &Path,
    upper: &Path,
    base: TreeSnapshot,
    follower: Option<PageFollower>,
    out: &Outbound,
) -> Result<Vec<FileDigest>> {
    let dir = upper.to_owned();
    let delta_id = StreamId::new(StreamKind::UpperDelta, 0, "");
    let delta = send_stream(conn, &delta_id, out, move |sink| {
        // Frozen: the measured delta is what is written.
        let plan = DeltaPlan::new(&dir, &base)?;
        sink.declare(plan.len())?;
        let (_, summary) = plan.pack(sink)?;
        Ok(summary)
    });
    // The follower's last look at the complete dump takes every page file.
    let followed = follower.is_some();
    let images = send_all(
        conn,
        image_items(image_dir, 0, |name| followed && is_page_file(name))?,
        out,
    );
    let pages = async {
        match follower {
            Some(follower) => Ok(follower.finish().await?.digests),
            None => Ok(Vec::new()),
        }
    };
    let ((summary, delta), mut files, pages) = tokio::try_join!(
        async {
            delta
                .await
                .with_context(|| format!("sending the changes in {}", upper.display()))
        },
        images,
        pages
    )?;
    files.extend(pages);
    tracing::debug!(
        entries = summary.entries,
        removed = summary.removed,
        bytes = summary.bytes,
        "upper dir changes sent"
    );
    files.push(delta);
    Ok(files)
}

/// The regular files of an image dir but those `skip` names (the `parent`
/// link is not one: the destination makes its own), large ones in
/// segments, largest first, so that the big page files start at once and
/// the small ones fill the gaps.
fn image_items(dir: &Path, round: u32, skip: impl Fn(&str) -> bool) -> Result<Vec<Item>> {
    let mut images: Vec<(u64, Item)> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if skip(&name) {
            continue;
        }
        for (offset, len) in segments::cut(0, meta.len(), true) {
            let id = StreamId::new(StreamKind::Image, round, name.clone()).at(offset);
            images.push((
                len,
                Item::Segment {
                    id,
                    path: entry.path(),
                    len,
                },
            ));
        }
    }
    images.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    Ok(images.into_iter().map(|(_, item)| item).collect())
}

async fn send_all(
    conn: &quinn::Connection,
    items: Vec<Item>,
    out: &Outbound,
) -> Result<Vec<FileDigest>> {
    let mut pending = items.into_iter().peekable();
    let mut running = JoinSet::new();
    let mut large_running = 0;
    let mut done = Vec::new();
    loop {
        while running.len() < PARALLEL_STREAMS {
            let Some(next) = pending.peek() else { break };
            let large = next.is_large();
            if large && large_running >= PARALLEL_LARGE {
                break;
            }
            let Some(item) = pending.next() else { break };
            large_running += usize::from(large);
            let (conn, out) = (conn.clone(), out.clone());
            running.spawn(async move { (large, send_item(conn, item, out).await) });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (large, sent) = joined.context("a sending task panicked")?;
        large_running -= usize::from(large);
        done.push(sent?);
    }
    Ok(done)
}

async fn send_item(conn: quinn::Connection, item: Item, out: Outbound) -> Result<FileDigest> {
    match item {
        Item::Segment { id, path, len } => send_segment(&conn, &id, path.clone(), len, &out)
            .await
            .with_context(|| format!("sending {}", path.display())),
        Item::Tree { id, dir } => {
            let what = dir.display().to_string();
            let ((), digest) = send_stream(&conn, &id, &out, move |sink| {
                // A lower layer does not change: its measure is exact, and the
                // destination checks it against what the Hello announced.
                sink.declare(measure_dir(&dir)?)?;
                pack_dir(&dir, sink)?;
                Ok(())
            })
            .await
            .with_context(|| format!("sending {what}"))?;
            Ok(digest)
        }
    }
}
