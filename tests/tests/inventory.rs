//! End-to-end tests of the operator's commands around a drain: `migrate
//! ps`, `migrate status`, `migrate cancel <id>`, the source's layer digest
//! cache, and `migrate-dst gc` with the daemon's layer store limits.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use migrate_e2e::checks::{
    assert_destination_discarded, assert_running_on_source_unchanged, assert_work_dir_clean, heap,
    stderr, wait_for_heap, wait_for_ticks, wait_until_mid_transfer, GAME,
};
use migrate_e2e::inventory::{
    digest_of, gc, json_of, migrate_cli, plant_unused_layer, remove_on_destination, store_has,
};
use migrate_e2e::{sh, wait_until, Lab, SourceContainer};

fn ps(lab: &Lab) -> serde_json::Value {
    let runc_root = lab.path("runc-src");
    let out = migrate_cli(
        lab,
        &["ps", "--runc-root", runc_root.to_str().unwrap(), "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    json_of(&out)
}

fn entry<'a>(listing: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    listing["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {listing}"))
}

fn reasons(entry: &serde_json::Value) -> String {
    entry["why_not"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["reason"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("; ")
}

fn migrate_ok(lab: &Lab, container: &SourceContainer) -> serde_json::Value {
    let out = lab.migrate(container, &[]);
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    json_of(&out)
}

#[test]
fn ps_lists_containers_with_their_sizes_and_says_why_one_cannot_move() {
    let lab = Lab::new();
    let web = lab.start_container("ps-web", GAME);
    let db = lab.start_container("ps-db", GAME);
    let script = format!("sleep 1000 &\necho $! > /stopped.pid\nkill -STOP $!\n{GAME}");
    let stopped = lab.start_container("ps-stopped", &script);
    for c in [&web, &db, &stopped] {
        wait_for_ticks(c, 2);
    }

    let listing = ps(&lab);
    assert_eq!(listing["version"], 1, "{listing}");
    assert_eq!(listing["containers"].as_array().unwrap().len(), 3);
    for id in ["ps-web", "ps-db"] {
        let e = entry(&listing, id);
        assert_eq!(e["status"], "running", "{e}");
        assert_eq!(e["migratable"], true, "{e}");
        assert!(e["memory_bytes"].as_u64().unwrap() > 0, "{e}");
        // The game writes its counter into the rootfs: the upper dir.
        assert!(e["upper_bytes"].as_u64().unwrap() > 0, "{e}");
        assert_eq!(e["lower_layers"], 1, "{e}");
    }
    let e = entry(&listing, "ps-stopped");
    assert_eq!(e["migratable"], false, "{e}");
    assert!(reasons(e).starts_with("stopped tasks: pid "), "{e}");
    assert!(
        e["why_not"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("kill -CONT"),
        "{e}"
    );

    // Paused: not running, so not migratable; its memory is still counted.
    let runc_root = lab.path("runc-src");
    let runc = |args: &[&str]| {
        sh(std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(args))
    };
    runc(&["pause", "ps-db"]);
    let listing = ps(&lab);
    let e = entry(&listing, "ps-db");
    assert_eq!(e["status"], "paused", "{e}");
    assert_eq!(e["migratable"], false, "{e}");
    assert_eq!(reasons(e), "paused, not running", "{e}");
    assert!(e["memory_bytes"].as_u64().unwrap() > 0, "{e}");

    let text = migrate_cli(&lab, &["ps", "--runc-root", runc_root.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.starts_with("ID "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("ps-web ") && l.ends_with("  yes")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("ps-db ") && l.contains("no: paused, not running")),
        "{text}"
    );
    runc(&["resume", "ps-db"]);
}

#[test]
fn status_shows_interrupted_and_in_doubt_migrations_with_the_resolve_to_run() {
    let lab = Lab::new();
    let state = lab.source_state_dir();
    let dir = state.join("migrations");
    std::fs::create_dir_all(&dir).unwrap();
    for (id, phase, mode) in [
        ("st-cut", "started", "stop-and-copy"),
        ("st-doubt", "decided", "post-copy"),
    ] {
        // As a `migrate` killed at that point leaves it: nobody holds it.
        let record = serde_json::json!({
            "migration_id": format!("m-{id}"),
            "container_id": id,
            "destination": "198.18.0.2:7070",
            "mode": mode,
            "phase": phase,
            "holder_pid": null,
            "agent_pid": 999_999,
        });
        std::fs::write(dir.join(format!("{id}.json")), record.to_string()).unwrap();
    }

    let out = migrate_cli(&lab, &["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listing = json_of(&out);
    let migrations = listing["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), 2, "{listing}");
    let state_arg = format!("--state-dir {}", state.display());
    assert_eq!(migrations[0]["container"], "st-cut");
    assert_eq!(migrations[0]["standing"], "interrupted");
    assert_eq!(
        migrations[0]["resolve"],
        format!("migrate resolve st-cut {state_arg}")
    );
    assert_eq!(migrations[1]["standing"], "in-doubt");
    assert_eq!(
        migrations[1]["resolve"],
        format!("migrate resolve st-doubt {state_arg} --go-back")
    );

    let text = migrate_cli(&lab, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("st-cut to 198.18.0.2:7070 (stop-and-copy): interrupted before its decision"),
        "{text}"
    );
    assert!(
        text.contains(&format!("run: migrate resolve st-cut {state_arg}")),
        "{text}"
    );
    assert!(text.contains("IN DOUBT"), "{text}");

    // Nothing to cancel: no `migrate` works on either.
    let out = migrate_cli(&lab, &["cancel", "st-cut"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no live migration of st-cut"));
}

#[test]
fn cancel_during_a_migration_rolls_it_back_and_the_container_runs_here_unchanged() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let container = lab.start_container("cx1", &format!("{}{GAME}", heap("384M", "0")));
    wait_for_heap(&container.rootfs);
    let before = wait_for_ticks(&container, 3);
    let pid = container.pid().unwrap();

    let mut child = lab
        .migrate_command(&container, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_mid_transfer(&dst, "cx1", &mut child);

    // While it runs, status and ps say who works on it.
    let listing = json_of(&migrate_cli(&lab, &["status", "--json"]));
    let m = &listing["migrations"][0];
    assert_eq!(m["container"], "cx1", "{listing}");
    assert_eq!(m["standing"], "in-progress", "{listing}");
    assert_eq!(m["pid"], child.id(), "{listing}");
    assert_eq!(m["phase"], "started", "{listing}");
    let e = entry(&ps(&lab), "cx1").clone();
    assert_eq!(e["migratable"], false, "{e}");
    assert_eq!(
        reasons(&e),
        format!("being migrated (migrate pid {})", child.id())
    );

    // The destination says it is receiving it, nothing restored yet.
    let out = std::process::Command::new(migrate_e2e::bin("migrate-dst"))
        .args(["status", "--json", "--state-dir"])
        .arg(&dst.state_dir)
        .output()
        .unwrap();
    let status = json_of(&out);
    assert_eq!(status["containers"][0]["container"], "cx1", "{status}");
    assert_eq!(status["containers"][0]["phase"], "receiving", "{status}");
    assert_eq!(status["containers"][0]["arriving"], true, "{status}");

    let runc_root = lab.path("runc-src");
    let out = migrate_cli(
        &lab,
        &[
            "cancel",
            "cx1",
            "--json",
            "--runc-root",
            runc_root.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "cancel failed: {}", stderr(&out));
    let cancelled = json_of(&out);
    assert_eq!(cancelled["pid"], child.id(), "{cancelled}");
    assert_eq!(cancelled["phase"], "started", "{cancelled}");
    assert_eq!(cancelled["runs_on"], "source", "{cancelled}");

    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted by migrate cancel"), "{err}");
    assert_running_on_source_unchanged(&container, pid, &before);
    assert_destination_discarded(&dst, "cx1");
    assert_work_dir_clean(&lab);
    assert!(!lab
        .source_state_dir()
        .join("migrations/cx1.cancel")
        .exists());

    // Over: nothing left to cancel.
    let out = migrate_cli(&lab, &["cancel", "cx1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn a_second_migration_from_the_same_layer_hashes_nothing() {
    let lab = Lab::new();
    // The digest cache trusts only a tree that settled (racy-clean rule).
    std::thread::sleep(Duration::from_millis(2500));
    let _dst = lab.start_destination(&[]);
    let first = lab.start_container("dc1", GAME);
    wait_for_ticks(&first, 2);
    let summary = migrate_ok(&lab, &first);
    assert_eq!(summary["layers_hashed"], 1, "{summary}");
    assert!(lab.source_state_dir().join("layer-digests.json").is_file());

    let second = lab.start_container("dc2", GAME);
    wait_for_ticks(&second, 2);
    let summary = migrate_ok(&lab, &second);
    assert_eq!(summary["layers_hashed"], 0, "{summary}");
    assert_eq!(summary["layers_reused"], 1, "{summary}");
}

#[test]
fn gc_removes_the_layers_no_container_uses_and_keeps_the_others() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let layer = digest_of(&lab.layer);
    let unused = format!("b3:{}", "0".repeat(64));
    for id in ["gc1", "gc2"] {
        let c = lab.start_container(id, GAME);
        wait_for_ticks(&c, 2);
        migrate_ok(&lab, &c);
    }
    plant_unused_layer(&dst, &unused);

    // gc1 goes; gc2 still uses the layer. Its dir is as an older daemon
    // wrote it, without layers.json: its mounted rootfs says it.
    remove_on_destination(&dst, "gc1");
    std::fs::remove_file(dst.container_dir("gc2").join("layers.json")).unwrap();
    let out = gc(&dst, &["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json_of(&out);
    assert_eq!(report["removed"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["removed"][0]["digest"], unused.as_str(), "{report}");
    assert_eq!(report["layers_in_use"], 1, "{report}");
    assert!(!store_has(&dst, &unused));
    assert!(store_has(&dst, &layer));

    // gc2 goes too: now its layer is unused.
    remove_on_destination(&dst, "gc2");
    let dry = json_of(&gc(&dst, &["--dry-run", "--json"]));
    assert_eq!(dry["removed"][0]["digest"], layer.as_str(), "{dry}");
    assert!(store_has(&dst, &layer), "a dry run removes nothing");
    let out = gc(&dst, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains(&format!("removed {layer}")) && text.contains("no container uses it"),
        "{text}"
    );
    assert!(!store_has(&dst, &layer));
}

#[test]
fn the_daemon_applies_its_layer_store_limit_at_start() {
    let lab = Lab::new();
    let unused = format!("b3:{}", "1".repeat(64));
    {
        let dst = lab.start_destination(&[]);
        plant_unused_layer(&dst, &unused);
    }
    let dst = lab.start_destination(&["--layer-store-max", "1B"]);
    wait_until("the unused layer to go", Duration::from_secs(10), || {
        !store_has(&dst, &unused)
    });
    let log = dst.log_text();
    assert!(
        log.contains(&format!("removed {unused}")) && log.contains("over --layer-store-max"),
        "{log}"
    );
}
