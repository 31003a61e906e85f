//! Faults of resources and tools between the two namespace hosts: full
//! disks, corrupted data, a destination that already has the container or
//! too many migrations, CRIU failing, and migrations at once. Each checks
//! that the container runs exactly once, with its memory and files, that
//! nothing is left behind, and what the error says.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use migrate_e2e::checks::{
    assert_destination_discarded, assert_heap_intact, assert_running_on_source_unchanged,
    assert_work_dir_clean, counter, heap, stderr, wait_for_heap, wait_for_ticks, GAME,
};
use migrate_e2e::resources::{
    assert_no_network_lock, failed_on_source, fault_injection_migrate, peak_rss_kib, Tmpfs,
};
use migrate_e2e::{
    bin, mounts_under, runc_exec, wait_until, Destination, Lab, SourceContainer, DST_ADDR,
    DST_PORT, SRC_ADDR,
};

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
        err.contains(" free, the migration's layers and the upper dir need about"),
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
fn destination_images_beyond_the_image_space_are_refused_in_preflight() {
    let lab = Lab::new();
    let image_space = Tmpfs::behind(&lab.image_dir("dst"), 1);
    let dst = lab.start_destination(&[]);
    let container = start_with_heap(&lab, "tiny1", "64M");
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let err = failed_on_source(&lab.migrate(&container, &[]));
    assert!(
        err.contains("the destination refused the migration"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{} has 1.00 MiB free, the migration's images need about",
            dst.image_dir.display()
        )),
        "the refusal must say the images do not fit the image dir: {err}"
    );
    assert!(
        !err.contains("the migration's layers and the upper dir need"),
        "the disk has room: {err}"
    );
    assert!(
        err.contains("was not touched and is running on the source"),
        "{err}"
    );
    assert_resumed_and_clean(&lab, &dst, &container, pid, &before);
    image_space.assert_holds_no_mounts();
}

#[test]
fn an_image_dir_not_on_a_tmpfs_is_refused_at_start() {
    let lab = Lab::new();
    // Beside the build: on the disk, whatever /tmp is.
    let on_disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let image_dir = on_disk.path().join("images");
    let out = lab
        .hosts
        .on(&lab.hosts.dst, &bin("migrate-dst"))
        .arg("--listen")
        .arg(format!("{DST_ADDR}:{DST_PORT}"))
        .args(["--allow", SRC_ADDR, "--tls-dir"])
        .arg(&lab.tls_dst)
        .arg("--state-dir")
        .arg(lab.path("dst-state"))
        .arg("--image-dir")
        .arg(&image_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "migrate-dst started: {err}");
    assert!(
        err.contains(&format!("--image-dir {} is on ", image_dir.display()))
            && err.contains(", not a tmpfs"),
        "the refusal must name the dir and its filesystem: {err}"
    );
    assert!(!err.contains("listening"), "{err}");
}

#[test]
fn destination_image_space_filling_during_the_transfer_resumes_the_container() {
    let lab = Lab::new();
    // Room for the preflight's estimate (memory + 64 MiB kept free).
    let disk = Tmpfs::behind(&lab.image_dir("dst"), 448);
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

#[test]
fn a_byte_corrupted_after_the_checksum_is_caught_and_nothing_restored() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("corrupt1", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    // The memory of the container's first process, corrupted after the
    // sender hashed it and before zstd and QUIC saw it.
    let mut migrate = lab.migrate_command_of(&fault_injection_migrate(), &container, &[]);
    migrate.env("MIGRATE_FAULT_FLIP", "pages-1.img@100");
    let err = failed_on_source(&migrate.output().unwrap());
    assert!(err.contains("the destination failed"), "{err}");
    assert!(
        err.contains("image pages-1.img (final dump) is corrupt"),
        "{err}"
    );
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );
    assert!(
        !dst.log_text().contains("checkpoint verified"),
        "the destination restored from corrupt images:\n{}",
        dst.log_text()
    );
    assert_resumed_and_clean(&lab, &dst, &container, pid, &before);
}

#[test]
fn a_page_corrupted_in_the_post_copy_tunnel_is_refused_and_sent_again() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = start_with_heap(&lab, "corrupt2", "256M");
    let before = wait_for_ticks(&container, 3);

    // A byte 64 MiB into the pages the source relays, after the frame's
    // checksum: the destination must refuse the frame before CRIU maps it,
    // and the next connection must resend it clean.
    let mut migrate = lab.migrate_command_of(
        &fault_injection_migrate(),
        &container,
        &["--mode", "post-copy"],
    );
    migrate.env("MIGRATE_FAULT_FLIP", format!("page-tunnel@{}", 64u64 << 20));
    let out = migrate.output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        dst.log_text().contains("does not match its checksum"),
        "the destination never saw the corrupt frame:\n{}",
        dst.log_text()
    );
    assert!(
        dst.log_text().contains("the source is back"),
        "the destination did not take a new connection:\n{}",
        dst.log_text()
    );
    // Every page as it was: the heap checks its own checksums.
    let rootfs = dst.container_dir("corrupt2").join("rootfs");
    assert_heap_intact(&dst.runc_root, "corrupt2", &rootfs);
    let (token, count) = counter(|args| runc_exec(&dst.runc_root, "corrupt2", args));
    assert_eq!(token, before.0);
    assert!(count >= before.1);
    assert!(
        container.state().is_none(),
        "still registered on the source"
    );
}

#[test]
fn a_destination_that_already_has_the_container_refuses_before_freezing() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let first = lab.start_container("twice", GAME);
    wait_for_ticks(&first, 2);
    let out = lab.migrate(&first, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let on_destination = counter(|args| runc_exec(&dst.runc_root, "twice", args));
    drop(first);
    std::fs::remove_dir_all(lab.path("src-twice")).unwrap();

    // Another container of that id on the source: runc on the destination
    // has one already.
    let second = lab.start_container("twice", GAME);
    let before = wait_for_ticks(&second, 3);
    let pid = second.pid().unwrap();
    let err = failed_on_source(&lab.migrate(&second, &[]));
    assert!(
        err.contains("a container named twice already exists"),
        "{err}"
    );
    assert!(
        err.contains("was not touched and is running on the source"),
        "{err}"
    );
    assert_running_on_source_unchanged(&second, pid, &before);
    // The destination's container is as it was, and goes on.
    let after = counter(|args| runc_exec(&dst.runc_root, "twice", args));
    assert_eq!(after.0, on_destination.0);
    assert!(after.1 >= on_destination.1);
    assert!(dst.container_dir("twice").join("stdio.log").exists());

    // A state dir left for an id runc does not know: refused too.
    let third = lab.start_container("leftover", GAME);
    let before = wait_for_ticks(&third, 3);
    let pid = third.pid().unwrap();
    std::fs::create_dir(dst.container_dir("leftover")).unwrap();
    let err = failed_on_source(&lab.migrate(&third, &[]));
    assert!(
        err.contains("another migration of leftover is under way"),
        "{err}"
    );
    assert_running_on_source_unchanged(&third, pid, &before);
    assert!(
        dst.container_dir("leftover").exists(),
        "the refusal removed what it did not make"
    );
    assert_work_dir_clean(&lab);
}

#[test]
fn migrations_beyond_the_destinations_limit_are_refused_and_keep_running() {
    let lab = Lab::new();
    let dst = lab.start_destination(&["--max-migrations", "1"]);
    let big = start_with_heap(&lab, "limit1", "256M");
    let small = lab.start_container("limit2", GAME);
    let before = wait_for_ticks(&small, 3);
    let pid = small.pid().unwrap();

    let mut first = lab.migrate_command(&big, &[]);
    let first = first
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "the first migration to pass preflight",
        Duration::from_secs(30),
        || dst.container_dir("limit1").exists(),
    );
    let err = failed_on_source(&lab.migrate(&small, &[]));
    assert!(err.contains("already receiving 1 migrations"), "{err}");
    assert!(err.contains("--max-migrations 1"), "{err}");
    assert!(
        err.contains("was not touched and is running on the source"),
        "{err}"
    );
    assert_running_on_source_unchanged(&small, pid, &before);
    assert!(!dst.container_dir("limit2").exists());

    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the first migration failed: {}",
        stderr(&out)
    );
    // The slot is free again.
    let out = lab.migrate(&small, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "limit2", args));
    assert_eq!(token, before.0);
}

#[test]
fn a_container_criu_cannot_dump_fails_with_criu_s_log_and_keeps_running() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    // A deleted file still open, larger than the ghost limit: CRIU refuses
    // to dump it.
    let script = format!("head -c 1048576 /dev/zero > /ghost; exec 4</ghost; rm /ghost\n{GAME}");
    let container = lab.start_container("ghost1", &script);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let err = failed_on_source(&lab.migrate(&container, &["--ghost-limit", "65536"]));
    assert!(
        err.contains("dump.log"),
        "the error must name CRIU's log: {err}"
    );
    assert!(
        err.contains("ghost"),
        "the error must show CRIU's reason from its log: {err}"
    );
    assert!(err.contains("running on the source"), "{err}");
    assert_resumed_and_clean(&lab, &dst, &container, pid, &before);
}

/// What the destination daemon may hold at most while receiving, per
/// migration, from the code's limits: the connection's receive window
/// (64 MiB, transport), and for each of the 16 streams the source opens at
/// once (send.rs), 8 chunks of 1 MiB in its channel, a 1 MiB zstd window and
/// a 1 MiB copy buffer (transfer) = 160 MiB; 224 MiB in all. Four, and 64 MiB
/// for the daemon itself, give this bound; four heaps of 320 MiB (1280 MiB)
/// exceed it, so a daemon that buffered whole images would fail.
const FOUR_MIGRATIONS_RSS_BOUND_MIB: u64 = 4 * 224 + 64;

#[test]
fn four_migrations_to_one_destination_at_once_all_arrive_in_bounded_memory() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let ids = ["many1", "many2", "many3", "many4"];
    let containers: Vec<_> = ids
        .iter()
        .map(|id| start_with_heap(&lab, id, "320M"))
        .collect();
    let before: Vec<_> = containers.iter().map(|c| wait_for_ticks(c, 2)).collect();
    let children: Vec<_> = containers
        .iter()
        .map(|c| {
            lab.migrate_command(c, &[])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for (container, before) in containers.iter().zip(&before) {
        assert!(
            container.state().is_none(),
            "{} still on the source",
            container.id
        );
        let exec = |args: &[&str]| runc_exec(&dst.runc_root, &container.id, args);
        let after = counter(exec);
        assert_eq!(after.0, before.0, "{} was restarted", container.id);
        assert!(after.1 >= before.1, "{}: counter went back", container.id);
        let rootfs = dst.container_dir(&container.id).join("rootfs");
        migrate_e2e::checks::assert_heap_intact(&dst.runc_root, &container.id, &rootfs);
    }
    assert!(mounts_under(&containers[0].runc_root).is_empty());
    assert_work_dir_clean(&lab);
    let peak_mib = peak_rss_kib(dst.pid().unwrap()) >> 10;
    eprintln!("migrate-dst peak RSS: {peak_mib} MiB");
    assert!(
        peak_mib < FOUR_MIGRATIONS_RSS_BOUND_MIB,
        "migrate-dst peaked at {peak_mib} MiB, beyond {FOUR_MIGRATIONS_RSS_BOUND_MIB} MiB"
    );
}

/// runc, except that it is given a bundle that does not exist: a restore
/// fails in runc itself, which says why in its log.
const RUNC_WITHOUT_BUNDLE: &str = r#"#!/bin/sh
prev=
for arg do
    shift
    if [ "$prev" = --bundle ]; then arg=/nonexistent-bundle; fi
    prev=$arg
    set -- "$@" "$arg"
done
exec runc "$@"
"#;

#[test]
fn runc_failing_on_either_side_is_reported_and_the_container_keeps_running() {
    let lab = Lab::new();
    let runc = lab.path("runc-without-bundle");
    std::fs::write(&runc, RUNC_WITHOUT_BUNDLE).unwrap();
    std::fs::set_permissions(&runc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dst = lab.start_destination(&["--runc", runc.to_str().unwrap()]);
    let container = lab.start_container("runc1", GAME);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    // The source's runc missing: nothing is touched.
    let err = failed_on_source(&lab.migrate(&container, &["--runc", "/nonexistent/runc"]));
    assert!(
        err.contains("cannot run /nonexistent/runc: is it installed?"),
        "{err}"
    );
    assert_running_on_source_unchanged(&container, pid, &before);

    // The destination's runc failing its restore, after the freeze.
    let err = failed_on_source(&lab.migrate(&container, &[]));
    assert!(err.contains("the destination failed at restore"), "{err}");
    assert!(err.contains("/nonexistent-bundle"), "{err}");
    assert!(
        err.contains("was resumed and is running on the source"),
        "{err}"
    );
    assert_resumed_and_clean(&lab, &dst, &container, pid, &before);
}
