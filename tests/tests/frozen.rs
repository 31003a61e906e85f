//! The frozen step's transfer: large page files go in segments, side by side
//! and while CRIU still writes them, and arrive byte for byte or not at all.

#![allow(clippy::unwrap_used)]

use migrate_common::transfer::segments::SEGMENT_BYTES;
use migrate_e2e::checks::{
    assert_destination_discarded, assert_heap_intact, assert_work_dir_clean, heap_status, stderr,
    wait_for_heap,
};
use migrate_e2e::resources::{failed_on_source, fault_injection_migrate};
use migrate_e2e::{Lab, SourceContainer};

/// A container whose first process (`pages-1.img`) is a heap of `size`.
fn start_heap_only(lab: &Lab, id: &str, size: &str) -> SourceContainer {
    let script = format!(
        "exec /bin/migrate-heap --size {size} --dirty 0 --status /heap/status.json >/dev/null 2>&1\n"
    );
    let container = lab.start_container(id, &script);
    wait_for_heap(&container.rootfs);
    container
}

#[test]
fn a_large_heap_crosses_in_segments_some_while_criu_still_dumps() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = start_heap_only(&lab, "seg1", "256M");

    let out = lab.migrate(&container, &["--mode", "stop-and-copy"]);
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = summary["rounds"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["kind"], "final", "{summary}");
    // 256 MiB of pages in 32 MiB segments: at least 8 streams for the heap's
    // file alone, besides the other images and the upper dir.
    assert!(
        summary["files"].as_u64().unwrap() >= (256 << 20) / SEGMENT_BYTES + 2,
        "{summary}"
    );
    let during = last["bytes_raw_during_dump"].as_u64().unwrap();
    assert!(
        during > 0 && during <= last["bytes_raw"].as_u64().unwrap(),
        "nothing was sent while CRIU dumped 256 MiB: {last}"
    );
    let rootfs = dst.container_dir("seg1").join("rootfs");
    assert_heap_intact(&dst.runc_root, "seg1", &rootfs);
    assert!(
        container.state().is_none(),
        "still registered on the source"
    );
}

#[test]
fn a_byte_corrupted_in_a_later_segment_is_caught_and_the_source_resumes() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = start_heap_only(&lab, "seg2", "96M");
    let pid = container.pid().unwrap();
    let flipped = SEGMENT_BYTES + 4096 * 7 + 3;

    let mut migrate = lab.migrate_command_of(&fault_injection_migrate(), &container, &[]);
    migrate.env("MIGRATE_FAULT_FLIP", format!("pages-1.img@{flipped}"));
    let err = failed_on_source(&migrate.output().unwrap());
    let segment = format!("image pages-1.img from byte {SEGMENT_BYTES} (final dump) is corrupt");
    assert!(err.contains(&segment), "{segment:?} not in:\n{err}");
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );
    assert!(
        !dst.log_text().contains("checkpoint verified"),
        "the destination restored from corrupt images:\n{}",
        dst.log_text()
    );
    assert_eq!(container.pid(), Some(pid), "not the original process");
    assert!(heap_status(&container.rootfs).is_some());
    assert_heap_intact(&container.runc_root, "seg2", &container.rootfs);
    assert_destination_discarded(&dst, "seg2");
    assert_work_dir_clean(&lab);
}
