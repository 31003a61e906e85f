//! End-to-end: how the data crosses, `--compression` (none, zstd and auto,
//! as the summary reports them) and `--max-bandwidth` (the cap holds the
//! frozen step's transfer and post-copy's pages to its rate). Run as root,
//! one at a time.

#![allow(clippy::unwrap_used)]

use migrate_e2e::checks::{
    assert_heap_intact, counter, heap, stderr, wait_for_heap, wait_for_ticks, GAME,
};
use migrate_e2e::{runc_exec, Lab};

/// The cap the bandwidth tests set, bytes per second: 64 MiB take 6.4 s at
/// it, several times what they take uncapped here (about 37 MB/s seen on a
/// loaded 2-core host, debug builds).
const CAP: u64 = 10 << 20;

fn summary_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "migrate failed:\n{}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn without_compression_the_images_cross_as_they_are_and_intact() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let script = format!("{}{GAME}", heap("64M", "0"));
    let container = lab.start_container("plain1", &script);
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    let summary = summary_of(&lab.migrate(&container, &["--compression", "none"]));
    let compression = &summary["compression"];
    assert_eq!(compression["requested"], "none", "{summary}");
    assert_eq!(compression["codec"], "none", "{summary}");
    assert_eq!(compression["threads"], serde_json::Value::Null, "{summary}");
    assert!(
        compression["reason"].as_str().unwrap().contains("none"),
        "{summary}"
    );
    assert_eq!(summary["max_bandwidth"], serde_json::Value::Null);
    let final_round = summary["rounds"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let images_raw = final_round["bytes_raw"].as_u64().unwrap();
    assert!(
        images_raw > 64 << 20,
        "the dump left out the heap: {summary}"
    );
    // Nothing was compressed: the streams carried exactly the raw bytes, and
    // the link those and QUIC's own. (The round's own wire figure is read
    // when its streams are written, before QUIC has sent all of them.)
    assert_eq!(
        summary["bytes_compressed"], summary["bytes_raw"],
        "{summary}"
    );
    let (raw, wire) = (
        summary["bytes_raw"].as_u64().unwrap(),
        summary["bytes_wire"].as_u64().unwrap(),
    );
    assert!(
        raw >= images_raw && wire >= raw,
        "the link carried less than the uncompressed data: {summary}"
    );

    let rootfs = dst.container_dir("plain1").join("rootfs");
    assert_heap_intact(&dst.runc_root, "plain1", &rootfs);
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "plain1", args));
    assert_eq!(token, before.0, "restarted, not migrated");
}

#[test]
fn with_zstd_the_summary_says_zstd_and_the_data_shrinks() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("zstd1", GAME);
    let before = wait_for_ticks(&container, 3);

    let summary = summary_of(&lab.migrate(&container, &["--compression", "zstd"]));
    let compression = &summary["compression"];
    assert_eq!(compression["requested"], "zstd", "{summary}");
    assert_eq!(compression["codec"], "zstd", "{summary}");
    assert_eq!(compression["level"], 1, "{summary}");
    assert!(compression["threads"].as_u64().unwrap() >= 1, "{summary}");
    let (raw, compressed) = (
        summary["bytes_raw"].as_u64().unwrap(),
        summary["bytes_compressed"].as_u64().unwrap(),
    );
    assert!(compressed < raw, "zstd did not shrink anything: {summary}");
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "zstd1", args));
    assert_eq!(token, before.0, "restarted, not migrated");
}

#[test]
fn max_bandwidth_holds_the_transfer_to_its_rate() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let script = format!("{}{GAME}", heap("64M", "0"));
    let container = lab.start_container("capped1", &script);
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    // Uncompressed, so that the bytes the cap counts are the images' own.
    let cap = CAP.to_string();
    let summary = summary_of(&lab.migrate(
        &container,
        &["--compression", "none", "--max-bandwidth", &cap],
    ));
    assert_eq!(summary["max_bandwidth"], CAP, "{summary}");
    let final_round = summary["rounds"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let sent = final_round["bytes_raw"].as_u64().unwrap();
    assert!(sent >= 60 << 20, "too little to time: {summary}");
    // Only a working cap makes the frozen step's transfer this slow: the
    // same bytes uncapped cross in a fraction of it.
    let floor = sent as f64 / CAP as f64 * 0.8;
    let took = final_round["transfer_s"].as_f64().unwrap();
    assert!(
        took >= floor,
        "{sent} bytes at most {CAP} bytes/s crossed in {took:.2}s, under {floor:.2}s: {summary}"
    );
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "capped1", args));
    assert_eq!(token, before.0, "restarted, not migrated");
}

#[test]
fn auto_measures_both_rates_before_the_freeze_and_says_which_won() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let script = format!("{}{GAME}", heap("64M", "0"));
    let container = lab.start_container("auto1", &script);
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    let summary = summary_of(&lab.migrate(&container, &[]));
    let compression = &summary["compression"];
    eprintln!("compression: {compression}");
    assert_eq!(compression["requested"], "auto", "{summary}");
    let link = compression["link_bytes_per_s"].as_f64().unwrap();
    let zstd = compression["zstd_bytes_per_s"].as_f64().unwrap();
    assert!(link > 0.0 && zstd > 0.0, "{summary}");
    // The probe ran, and its figure is the link's.
    let probed = compression["link_probe_bytes_per_s"].as_f64().unwrap();
    assert_eq!(link, probed, "{summary}");
    assert_eq!(compression["link_rate_source"], "probe", "{summary}");
    // Stop-and-copy here: no pre-copy round to sample, so the fixed one.
    assert_eq!(
        compression["zstd_sample"], "a memory-like sample",
        "{summary}"
    );
    // The codec is the rule's on the figures reported.
    let expected = if link * 1.25 < zstd { "zstd" } else { "none" };
    assert_eq!(compression["codec"], expected, "{summary}");
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "auto1", args));
    assert_eq!(token, before.0, "restarted, not migrated");
}

#[test]
fn max_bandwidth_holds_post_copy_pages_to_its_rate() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let script = format!("{}{GAME}", heap("64M", "0"));
    let container = lab.start_container("capped2", &script);
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);

    let cap = CAP.to_string();
    let summary = summary_of(&lab.migrate(
        &container,
        &["--mode", "post-copy", "--max-bandwidth", &cap],
    ));
    assert_eq!(summary["max_bandwidth"], CAP, "{summary}");
    let relayed = summary["bytes_pages"].as_u64().unwrap();
    assert!(relayed >= 64 << 20, "the heap did not cross: {summary}");
    // The pages follow the restore through the tunnel, which the cap holds.
    let floor = relayed as f64 / CAP as f64 * 0.8;
    let took = summary["pages_after_restore_ms"].as_u64().unwrap() as f64 / 1000.0;
    assert!(
        took >= floor,
        "{relayed} bytes of pages at most {CAP} bytes/s crossed in {took:.2}s, under {floor:.2}s: {summary}"
    );
    let rootfs = dst.container_dir("capped2").join("rootfs");
    assert_heap_intact(&dst.runc_root, "capped2", &rootfs);
    let (token, _) = counter(|args| runc_exec(&dst.runc_root, "capped2", args));
    assert_eq!(token, before.0, "restarted, not migrated");
}
