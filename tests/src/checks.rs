//! What the end-to-end tests check, shared by every test file: the game
//! container whose memory, files and loopback server prove a migration kept
//! its state, and the assertions that nothing is left behind.

use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use crate::{mounts_under, wait_until, Destination, Lab, SourceContainer};

/// The container's game: a random token and a counter kept only in the
/// shell's memory, a file held open on descriptor 3, a cwd, a file deleted
/// from the lower layer (an overlay whiteout), a file created in the upper
/// dir, and an HTTP server on the container's own loopback.
pub const GAME: &str = r#"
set -e
mkdir -p /work
cd /work
exec 3</etc/game.conf
token=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
rm /etc/group
echo "made before the migration" > /work/made-before
httpd -p 127.0.0.1:8080 -h /work
i=0
while true; do
    i=$((i + 1))
    echo "$token $i" > /work/counter.new && mv /work/counter.new /work/counter
    echo "tick $token $i"
    sleep 0.2
done
"#;

/// (token, count) as the game last wrote them, read through `exec`.
pub fn counter(exec: impl Fn(&[&str]) -> String) -> (String, u64) {
    let text = exec(&["cat", "/work/counter"]);
    let (token, count) = text.trim().split_once(' ').unwrap();
    (token.to_owned(), count.parse().unwrap())
}

pub fn wait_for_ticks(container: &SourceContainer, ticks: u64) -> (String, u64) {
    let mut last = (String::new(), 0);
    wait_until("the game to tick", Duration::from_secs(20), || {
        if let Ok(text) = std::fs::read_to_string(container.rootfs.join("work/counter")) {
            if let Some((t, c)) = text.trim().split_once(' ') {
                last = (t.to_owned(), c.parse().unwrap_or(0));
            }
        }
        last.1 >= ticks
    });
    last
}

/// What migrate printed on stderr; echoed into the test's output, which
/// cargo shows when the test fails.
pub fn stderr(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("--- migrate ({}) said:\n{text}---", out.status);
    text
}

/// The container still runs on the source with the same process and memory:
/// same pid, same token, and the counter goes on past `before`.
pub fn assert_running_on_source_unchanged(
    container: &SourceContainer,
    pid: u64,
    before: &(String, u64),
) {
    assert_eq!(
        container.pid(),
        Some(pid),
        "the container must run on the source with its original pid"
    );
    let now = wait_for_ticks(container, before.1 + 3);
    assert_eq!(
        now.0, before.0,
        "the in-memory token changed: the container was restarted, not resumed"
    );
}

pub fn assert_work_dir_clean(lab: &Lab) {
    let left: Vec<_> = std::fs::read_dir(lab.work_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "the source left working dirs behind: {left:?}"
    );
}

/// The destination removed everything it had made for `id`.
pub fn assert_destination_discarded(dst: &Destination, id: &str) {
    wait_until(
        "the destination to remove its partial state",
        Duration::from_secs(20),
        || !dst.container_dir(id).exists(),
    );
    assert!(
        dst.runc(&["state", id]).stdout.is_empty(),
        "runc still knows {id} on the destination"
    );
    assert_no_images(dst, id);
    assert!(
        mounts_under(&dst.state_dir).is_empty(),
        "mounts left: {:?}",
        mounts_under(&dst.state_dir)
    );
    assert!(mounts_under(&dst.runc_root).is_empty());
}

/// A shell line that starts the heap workload in the background: `size` of
/// checksummed memory that compresses like a real heap, status in
/// /heap/status.json.
pub fn heap(size: &str, dirty: &str) -> String {
    format!(
        "/bin/migrate-heap --size {size} --dirty {dirty} --status /heap/status.json >/dev/null 2>&1 &\n"
    )
}

/// The heap workload's status, read through a rootfs.
pub fn heap_status(rootfs: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(rootfs.join("heap/status.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Waits until the heap workload has filled its memory.
pub fn wait_for_heap(rootfs: &Path) {
    wait_until("the heap to be filled", Duration::from_secs(60), || {
        heap_status(rootfs).is_some_and(|s| s["ready_ms"].as_u64().unwrap_or(0) > 0)
    });
}

/// Makes the heap workload of container `id` (runc root `runc_root`, rootfs
/// `rootfs`) check every page of its memory, and asserts that all are as
/// they must be.
pub fn assert_heap_intact(runc_root: &Path, id: &str, rootfs: &Path) {
    let before = heap_status(rootfs)
        .and_then(|s| s["verify"]["n"].as_u64())
        .unwrap_or(0);
    crate::runc_exec(
        runc_root,
        id,
        &["sh", "-c", "kill -USR1 $(pidof migrate-heap)"],
    );
    let mut last = None;
    wait_until(
        "the heap to verify itself",
        Duration::from_secs(120),
        || {
            last = heap_status(rootfs);
            last.as_ref()
                .and_then(|s| s["verify"]["n"].as_u64())
                .is_some_and(|n| n > before)
        },
    );
    let status = last.unwrap();
    assert_eq!(
        status["verify"]["ok"], true,
        "the container's memory is corrupt: {status}"
    );
    assert!(status["verify"]["pages"].as_u64().unwrap() > 0, "{status}");
}

/// Returns once the container's memory is arriving at the destination (more
/// than 16 MiB of it): the source is frozen, nothing is restored yet.
pub fn wait_until_mid_transfer(dst: &Destination, id: &str, migrate: &mut Child) {
    let images = dst.container_dir(id).join("images/final");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let arriving = std::fs::read_dir(&images).is_ok_and(|dir| {
            dir.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("pages-")
                    && e.metadata().is_ok_and(|m| m.len() > 16 << 20)
            })
        });
        if arriving {
            return;
        }
        if let Some(status) = migrate.try_wait().unwrap() {
            panic!("migrate ended ({status}) before its memory arrived");
        }
        assert!(Instant::now() < deadline, "the memory never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination holds no images of `id` in its image dir: a migration
/// that ended, however it ended, leaves none.
pub fn assert_no_images(dst: &Destination, id: &str) {
    let images = dst.images_of(id);
    assert!(
        dst.image_dir.is_dir(),
        "{} is not there",
        dst.image_dir.display()
    );
    assert!(
        !images.exists(),
        "the destination left images in {}: {:?}",
        images.display(),
        std::fs::read_dir(&images).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
}
