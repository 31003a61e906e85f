//! Faults of resources and tools between the two namespace hosts: full
//! disks, corrupted data, a destination that already has the container or
//! too many migrations, CRIU failing, and migrations at once. Each checks
//! that the container runs exactly once, with its memory and files, that
//! nothing is left behind, and what the error says.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use migrate_e2e::checks::{
    assert_destination_discarded, assert_running_on_source_unchanged, assert_work_dir_clean,
    counter, heap, stderr, wait_for_heap, wait_for_ticks, GAME,
};
use migrate_e2e::resources::{
    assert_no_network_lock, failed_on_source, fault_injection_migrate, peak_rss_kib, Tmpfs,
};
use migrate_e2e::{mounts_under, runc_exec, wait_until, Destination, Lab, SourceContainer};

/// The game beside `size` of checksummed heap, its memory filled.
fn start_with_heap(lab: &Lab, id: &str, size: &str) -> SourceContainer {
    let container = lab.start_container(id, &format!("{}{GAME}", heap(size, "0")));
    wait_for_heap(&container.rootfs);
    container
}

/// The source container resumed untouched, and nothing of it left anywhere.
fn assert_resumed_and_clean(
    lab: &Lab,
    dst: &Destination,
    container: &SourceContainer,
    pid: u64,
    before: &(String, u64),
) {
    assert_running_on_source_unchanged(container, pid, before);
    assert_no_network_lock(pid);
    assert_destination_discarded(dst, &container.id);
    assert_work_dir_clean(lab);
    let layers = dst.state_dir.join("layers");
    let half_written: Vec<_> = std::fs::read_dir(&layers)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(".incoming-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        half_written.is_empty(),
        "half-written layers: {half_written:?}"
    );
}

#[test]
fn destination_without_room_refuses_in_preflight() {
    let lab = Lab::new();
    let disk = Tmpfs::behind(&lab.path("dst-state"), 64);
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("full1", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let err = failed_on_source(&lab.migrate(&container, &[]));
    assert!(
        err.contains("the destination refused the migration"),
        "{err}"
    );
    assert!(
        err.contains("MiB free, the migration needs about"),
        "the refusal must say the destination lacks disk space: {err}"
    );
    assert!(
        err.contains("was not touched and is running on the source"),
        "{err}"
    );
    assert_resumed_and_clean(&lab, &dst, &container, pid, &before);
    disk.assert_holds_no_mounts();
}

#[test]
fn destination_disk_filling_during_the_transfer_resumes_the_container() {
    let lab = Lab::new();
    // Room for the preflight's estimate (memory + 256 MiB kept free).
    let disk = Tmpfs::behind(&lab.path("dst-state"), 448);
    let dst = lab.start_destination(&[]);
    let container = start_with_heap(&lab, "full2", "128M");
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let mut migrate = lab.migrate_command(&container, &[]);
    let child = migrate
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Past the preflight: the destination claimed the container's dir.
    wait_until("the preflight to pass", Duration::from_secs(30), || {
        dst.container_dir("full2").exists()
    });
    let filler = disk.fill();
    let err = failed_on_source(&child.wait_with_output().unwrap());
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("the destination failed"), "{err}");
    assert!(err.contains("running on the source"), "{err}");
    std::fs::remove_file(filler).unwrap();
    assert_resumed_and_clean(&lab, &dst, &container, pid, &before);
    disk.assert_holds_no_mounts();
}

#[test]
fn source_work_dir_full_fails_the_dump_and_resumes_the_container() {
    let lab = Lab::new();
    let work = Tmpfs::behind(&lab.work_dir(), 16);
    let dst = lab.start_destination(&[]);
    let container = start_with_heap(&lab, "full3", "64M");
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let err = failed_on_source(&lab.migrate(&container, &[]));
    assert!(
        err.contains("No space left on device") || err.contains("ENOSPC"),
        "the error must show CRIU's log of the full disk: {err}"
    );
    assert!(err.contains("running on the source"), "{err}");
    assert_resumed_and_clean(&lab, &dst, &container, pid, &before);
    work.assert_holds_no_mounts();
}
