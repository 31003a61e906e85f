//! End-to-end post-copy migrations between two network-namespace hosts:
//! the container runs on the destination before its memory is there, and
//! its memory follows through the page tunnel on the migration's QUIC link.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use migrate_e2e::checks::{assert_work_dir_clean, counter, stderr, wait_for_ticks, GAME};
use migrate_e2e::{mounts_under, runc_exec, wait_until, Lab};

#[test]
fn post_copy_moves_the_container_before_its_memory() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("pc1", GAME);
    let before = wait_for_ticks(&container, 5);

    let out = lab.migrate(&container, &["--mode", "post-copy"]);
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{summary}");
    assert_eq!(summary["mode"]["used"], "post-copy", "{summary}");
    assert_eq!(summary["rounds"][0]["kind"], "lazy", "{summary}");
    assert!(summary["bytes_pages"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        summary["source_free_ms"].as_u64().unwrap() >= summary["downtime_ms"].as_u64().unwrap()
    );
    assert!(
        container.state().is_none(),
        "still registered on the source"
    );
    assert!(mounts_under(&container.runc_root).is_empty());
    assert_work_dir_clean(&lab);

    let exec = |args: &[&str]| runc_exec(&dst.runc_root, "pc1", args);
    let after = counter(exec);
    assert_eq!(after.0, before.0, "the in-memory token changed");
    wait_until("the game to go on", Duration::from_secs(10), || {
        counter(exec).1 >= after.1 + 3
    });
}
