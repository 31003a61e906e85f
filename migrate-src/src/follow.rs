//! The final dump's page files, sent while CRIU still writes them, so that
//! the frozen step's transfer overlaps the dump instead of following it.
//!
//! CRIU appends to each `pages-*.img` as it dumps a process's memory and
//! never rewrites what it wrote. While the dump runs the follower looks at
//! the image dir every few milliseconds and sends each whole segment a page
//! file has grown by ([`segments::cut`]) on a stream of its own; once CRIU
//! has reached post-dump (every image closed), [`PageFollower::finish`] sends
//! what is left of each. The other images are small and go once the dump is
//! complete, with the rest of the checkpoint.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use migrate_common::protocol::{FileDigest, StreamKind};
use migrate_common::transfer::segments;
use migrate_common::transfer::{send_segment, Outbound, StreamId};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// How often the image dir is looked at while CRIU writes it: a segment
/// takes CRIU a few tens of milliseconds to write here.
const POLL: Duration = Duration::from_millis(5);
/// Segments on the link at once: as many as `send.rs` keeps for large
/// files.
const IN_FLIGHT: usize = 4;

/// Whether CRIU writes the file as it dumps memory.
pub fn is_page_file(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// What the follower sent: a manifest entry per segment, and the files it
/// covered (the rest of the checkpoint leaves them out).
#[derive(Debug, Default)]
pub struct Followed {
    pub digests: Vec<FileDigest>,
    pub files: HashSet<String>,
}

/// Follows one dump's page files from the moment CRIU starts; dropped, it
/// stops at once (a failed dump leaves nothing to send).
#[derive(Debug)]
pub struct PageFollower {
    complete: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<Followed>>,
}

impl Drop for PageFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PageFollower {
    pub fn start(conn: &quinn::Connection, dir: &Path, out: &Outbound) -> Self {
        let (complete, completed) = oneshot::channel();
        let task = tokio::spawn(follow(conn.clone(), dir.to_owned(), out.clone(), completed));
        Self {
            complete: Some(complete),
            task,
        }
    }

    /// The dump is complete (CRIU is in post-dump): sends the rest of every
    /// page file and says what was sent.
    pub async fn finish(mut self) -> Result<Followed> {
        if let Some(complete) = self.complete.take() {
            let _ = complete.send(());
        }
        (&mut self.task)
            .await
            .context("the page file follower panicked")?
    }
}

/// One page file as followed: how far it has been cut.
#[derive(Debug, Default)]
struct Progress {
    cut_to: u64,
    done: bool,
}

async fn follow(
    conn: quinn::Connection,
    dir: PathBuf,
    out: Outbound,
    mut completed: oneshot::Receiver<()>,
) -> Result<Followed> {
    let mut files: BTreeMap<String, Progress> = BTreeMap::new();
    let mut queue: VecDeque<(String, u64, u64)> = VecDeque::new();
    let mut running = JoinSet::new();
    let mut followed = Followed::default();
    let mut complete = false;
    // Once the dump is complete, one last look cuts the rest of every file.
    let mut last_scan_done = false;
    loop {
        if !last_scan_done {
            scan(&dir, &mut files, &mut queue, complete)?;
            last_scan_done = complete;
        }
        while running.len() < IN_FLIGHT {
            let Some((name, offset, len)) = queue.pop_front() else {
                break;
            };
            let id = StreamId::new(StreamKind::Image, 0, name.clone()).at(offset);
            let (conn, out, path) = (conn.clone(), out.clone(), dir.join(&name));
            running.spawn(async move {
                send_segment(&conn, &id, path, len, &out)
                    .await
                    .with_context(|| format!("sending {id}"))
            });
        }
        if complete && queue.is_empty() && running.is_empty() {
            followed.files = files.into_keys().collect();
            return Ok(followed);
        }
        tokio::select! {
            Some(sent) = running.join_next(), if !running.is_empty() => {
                followed.digests.push(sent.context("a segment's task panicked")??);
            }
            _ = &mut completed, if !complete => complete = true,
            () = tokio::time::sleep(POLL), if !complete => {}
        }
    }
}

/// Cuts what the page files in `dir` have grown by into `queue`; with
/// `complete`, their rest too, after which they are done.
fn scan(
    dir: &Path,
    files: &mut BTreeMap<String, Progress>,
    queue: &mut VecDeque<(String, u64, u64)>,
    complete: bool,
) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_page_file(&name) {
            continue;
        }
        let size = entry
            .metadata()
            .with_context(|| format!("measuring {}", entry.path().display()))?
            .len();
        let progress = files.entry(name.clone()).or_default();
        if progress.done {
            continue;
        }
        for (offset, len) in segments::cut(progress.cut_to, size, complete) {
            queue.push_back((name.clone(), offset, len));
            progress.cut_to = offset + len;
        }
        progress.done = complete;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_page_files_are_followed() {
        assert!(is_page_file("pages-1.img"));
        assert!(is_page_file("pages-12.img"));
        assert!(!is_page_file("pagemap-1.img"));
        assert!(!is_page_file("core-1.img"));
        assert!(!is_page_file("dump.log"));
    }

    #[test]
    fn a_scan_cuts_growth_and_the_rest_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let pages = dir.path().join("pages-1.img");
        std::fs::write(&pages, vec![7u8; (segments::SEGMENT_BYTES + 10) as usize]).unwrap();
        std::fs::write(dir.path().join("pagemap-1.img"), b"map").unwrap();
        let (mut files, mut queue) = (BTreeMap::new(), VecDeque::new());

        scan(dir.path(), &mut files, &mut queue, false).unwrap();
        assert_eq!(
            Vec::from(queue.clone()),
            vec![("pages-1.img".to_owned(), 0, segments::SEGMENT_BYTES)]
        );
        scan(dir.path(), &mut files, &mut queue, false).unwrap();
        assert_eq!(queue.len(), 1, "nothing new was written");

        std::fs::write(dir.path().join("pages-2.img"), b"").unwrap();
        scan(dir.path(), &mut files, &mut queue, true).unwrap();
        scan(dir.path(), &mut files, &mut queue, true).unwrap();
        let mut cut: Vec<_> = queue.into_iter().collect();
        cut.sort();
        assert_eq!(
            cut,
            vec![
                ("pages-1.img".to_owned(), 0, segments::SEGMENT_BYTES),
                ("pages-1.img".to_owned(), segments::SEGMENT_BYTES, 10),
                ("pages-2.img".to_owned(), 0, 0),
            ]
        );
        assert!(files.values().all(|p| p.done));
    }
}
