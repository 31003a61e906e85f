//! End-to-end drains: `migrate drain` on the source host moving its
//! containers to one or two destination hosts, with real CRIU and runc.
//! Run as root, one at a time (`--test-threads=1`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use migrate_e2e::checks::{
    assert_running_on_source_unchanged, counter, heap, stderr, wait_for_heap, wait_for_ticks, GAME,
};
use migrate_e2e::drain::{first_destination, second_destination, TwoDestinations};
use migrate_e2e::{bin, runc_exec, wait_until, Destination, Lab, SourceContainer};

/// The drain's JSON report.
fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{}", stderr(out)))
}

/// The report's entries by container.
fn entries(report: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    report["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["container"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

/// A container whose bind mount source exists for it and for no
/// destination: the destinations may bind only under `binds`, and the
/// directory is moved out of `binds` once the container has it mounted.
/// The hosts share one filesystem, so this is how a path exists on the
/// source (in the container, bound by inode) and on no destination.
fn pinned(lab: &Lab, binds: &Path, id: &str) -> SourceContainer {
    let dir = binds.join(format!("only-on-source-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let container = lab.start_container_binding(id, GAME, &[(&dir, "/data")]);
    std::fs::rename(&dir, lab.path(&format!("kept-by-{id}"))).unwrap();
    container
}

fn allow_bind(binds: &Path) -> [&str; 2] {
    ["--allow-bind", binds.to_str().unwrap()]
}

/// The container moved to `dst` with its memory: same token, counter on.
fn assert_moved_with_state(dst: &Destination, id: &str, before: &(String, u64)) {
    let state: serde_json::Value = serde_json::from_slice(&dst.runc(&["state", id]).stdout)
        .unwrap_or_else(|_| panic!("{id} is not on {}", dst.runc_root.display()));
    assert_eq!(state["status"], "running", "{state}");
    let exec = |args: &[&str]| runc_exec(&dst.runc_root, id, args);
    let after = counter(exec);
    assert_eq!(after.0, before.0, "{id}: restarted, not migrated");
    assert!(after.1 >= before.1, "{id}: {before:?} -> {after:?}");
}

/// A script that records that it ran, standing in for `systemctl reboot`.
fn reboot_script(lab: &Lab) -> (PathBuf, PathBuf) {
    let marker = lab.path("rebooted");
    let script = lab.path("reboot.sh");
    std::fs::write(&script, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, marker)
}

#[test]
fn three_containers_to_two_destinations_one_cannot_move() {
    let lab = TwoDestinations::new();
    let binds = lab.path("binds");
    std::fs::create_dir_all(&binds).unwrap();
    let dst1 = lab.start_destination(&allow_bind(&binds));
    let dst2 = lab.start_second_destination(&allow_bind(&binds));
    let game1 = lab.start_container("game1", GAME);
    let game2 = lab.start_container("game2", GAME);
    let stuck = pinned(&lab, &binds, "pinned");
    let before1 = wait_for_ticks(&game1, 3);
    let before2 = wait_for_ticks(&game2, 3);
    let before3 = wait_for_ticks(&stuck, 3);
    let stuck_pid = stuck.pid().unwrap();

    let out = lab.drain_command(&lab.both()).output().unwrap();
    let said = stderr(&out);
    let report = report(&out);
    assert_eq!(
        out.status.code(),
        Some(5),
        "partial expected: {report}\n{said}"
    );
    assert_eq!(report["version"], 1);
    assert_eq!(report["exit_code"], 5);
    assert_eq!(report["totals"]["moved"], 2, "{report}");
    assert_eq!(report["totals"]["skipped"], 1, "{report}");
    let by_id = entries(&report);

    let mut used = Vec::new();
    for (id, before) in [("game1", &before1), ("game2", &before2)] {
        let entry = &by_id[id];
        assert_eq!(entry["outcome"], "moved", "{entry}");
        assert_eq!(entry["mode"], "stop-and-copy", "{entry}");
        assert!(entry["downtime_ms"].as_u64().unwrap() > 0, "{entry}");
        let to = entry["destination"].as_str().unwrap().to_owned();
        assert_eq!(entry["runs_on"], to.as_str());
        let dst = if to == first_destination() {
            &dst1
        } else {
            &dst2
        };
        assert_moved_with_state(dst, id, before);
        used.push(to);
    }
    // Equal destinations share the work.
    used.sort();
    assert_eq!(used, [first_destination(), second_destination()]);

    let entry = &by_id["pinned"];
    assert_eq!(entry["outcome"], "skipped", "{entry}");
    assert_eq!(entry["runs_on"], "source");
    let reason = entry["reason"].as_str().unwrap();
    for dst in [first_destination(), second_destination()] {
        assert!(
            reason.contains(&format!("{dst}: bind mount source")),
            "{dst} must say why: {reason}"
        );
    }
    assert_running_on_source_unchanged(&stuck, stuck_pid, &before3);
    assert!(!lab.source_state_dir().join("drain.pid").exists());
}

#[test]
fn a_dry_run_freezes_nothing_and_says_where_each_would_go() {
    let lab = TwoDestinations::new();
    let binds = lab.path("binds");
    std::fs::create_dir_all(&binds).unwrap();
    let dst1 = lab.start_destination(&allow_bind(&binds));
    let dst2 = lab.start_second_destination(&allow_bind(&binds));
    let game = lab.start_container("game1", GAME);
    let stuck = pinned(&lab, &binds, "pinned");
    let before = wait_for_ticks(&game, 3);
    let pid = game.pid().unwrap();

    let mut args = lab.both().to_vec();
    args.push("--dry-run".into());
    let drain = lab.spawn_drain(&args);
    let done = AtomicBool::new(false);
    let samples = AtomicUsize::new(0);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                for c in [&game, &stuck] {
                    assert!(!c.frozen(), "the dry run froze {}", c.id);
                }
                samples.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let out = drain.output();
        done.store(true, Ordering::SeqCst);
        out
    });
    let said = stderr(&out);
    assert!(samples.load(Ordering::SeqCst) > 5, "too few samples");
    let report = report(&out);
    assert_eq!(out.status.code(), Some(5), "{report}\n{said}");
    assert_eq!(report["dry_run"], true);
    let by_id = entries(&report);
    let entry = &by_id["game1"];
    assert_eq!(entry["outcome"], "would-move", "{entry}");
    assert_eq!(entry["destination"], first_destination(), "{entry}");
    assert_eq!(entry["mode"], "stop-and-copy");
    assert_eq!(entry["runs_on"], "source");
    assert_eq!(by_id["pinned"]["outcome"], "skipped");
    assert!(by_id["pinned"]["reason"]
        .as_str()
        .unwrap()
        .contains("bind mount source"));

    // Nothing moved, nothing claimed, nothing recorded.
    assert_running_on_source_unchanged(&game, pid, &before);
    for dst in [&dst1, &dst2] {
        assert!(!dst.container_dir("game1").exists());
        assert!(dst.runc(&["state", "game1"]).stdout.is_empty());
    }
    assert_eq!(lab.source_phase("game1"), None);
}

#[test]
fn at_waits_until_its_time() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let game = lab.start_container("game1", GAME);
    let before = wait_for_ticks(&game, 3);
    let pid = game.pid().unwrap();

    let started = Instant::now();
    let mut drain = lab.spawn_drain(&["--to", &first_destination(), "--at", "+4s"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(drain.try_wait().is_none(), "the drain did not wait");
    assert_eq!(game.pid(), Some(pid), "moved before its time");
    assert_eq!(lab.source_phase("game1"), None, "a migration started early");
    assert!(!dst.container_dir("game1").exists());
    // It waits with its pid file in place, so that it can be cancelled.
    assert!(lab.source_state_dir().join("drain.pid").exists());

    let out = drain.output();
    let elapsed = started.elapsed();
    let said = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("waiting until"), "{said}");
    assert!(elapsed >= Duration::from_secs(4), "{elapsed:?}");
    assert_eq!(entries(&report(&out))["game1"]["outcome"], "moved");
    assert_moved_with_state(&dst, "game1", &before);
}

#[test]
fn a_cancel_while_it_waits_moves_nothing() {
    let lab = Lab::new();
    let _dst = lab.start_destination(&[]);
    let game = lab.start_container("game1", GAME);
    let before = wait_for_ticks(&game, 3);
    let pid = game.pid().unwrap();

    let started = Instant::now();
    let drain = lab.spawn_drain(&["--to", &first_destination(), "--at", "+10m", "--reboot"]);
    wait_until("the drain's pid file", Duration::from_secs(10), || {
        lab.source_state_dir().join("drain.pid").exists()
    });
    let cancel = lab.cancel_drain_command().output().unwrap();
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let out = drain.output();
    stderr(&out);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "it went on waiting"
    );
    let report = report(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let entry = &entries(&report)["game1"];
    assert_eq!(entry["outcome"], "skipped", "{entry}");
    assert!(
        entry["reason"].as_str().unwrap().contains("SIGUSR1"),
        "{entry}"
    );
    assert_eq!(report["reboot"]["status"], "not-rebooting", "{report}");
    assert_running_on_source_unchanged(&game, pid, &before);
}

#[test]
fn reboot_only_once_every_container_moved() {
    let lab = Lab::new();
    let binds = lab.path("binds");
    std::fs::create_dir_all(&binds).unwrap();
    let dst = lab.start_destination(&allow_bind(&binds));
    let (script, marker) = reboot_script(&lab);
    let reboot = [
        "--reboot".to_owned(),
        format!("--reboot-command={}", script.display()),
    ];
    let to = ["--to".to_owned(), first_destination()];
    let args: Vec<String> = to.iter().chain(&reboot).cloned().collect();

    // One cannot move: no reboot, and the report says why.
    let game1 = lab.start_container("game1", GAME);
    let stuck = pinned(&lab, &binds, "pinned");
    wait_for_ticks(&game1, 2);
    let out = lab.drain_command(&args).output().unwrap();
    let said = stderr(&out);
    let first = report(&out);
    assert_eq!(out.status.code(), Some(5), "{first}");
    assert_eq!(first["reboot"]["status"], "not-rebooting", "{first}");
    assert!(said.contains("not rebooting"), "{said}");
    assert!(!marker.exists(), "rebooted although one container stayed");

    // Without it, every container moves and the host reboots.
    drop(stuck);
    let game2 = lab.start_container("game2", GAME);
    let before = wait_for_ticks(&game2, 2);
    let out = lab.drain_command(&args).output().unwrap();
    stderr(&out);
    let second = report(&out);
    assert_eq!(out.status.code(), Some(0), "{second}");
    assert_eq!(second["reboot"]["status"], "rebooting", "{second}");
    assert!(marker.exists(), "the reboot command did not run");
    assert_moved_with_state(&dst, "game2", &before);
}

#[test]
fn a_failed_reboot_command_is_exit_6() {
    // Nothing to move counts as everything moved.
    let lab = Lab::new();
    let out = lab
        .drain_command(&[
            "--to",
            &first_destination(),
            "--reboot",
            "--reboot-command=/bin/false",
        ])
        .output()
        .unwrap();
    stderr(&out);
    let report = report(&out);
    assert_eq!(out.status.code(), Some(6), "{report}");
    assert_eq!(report["totals"]["containers"], 0);
    assert_eq!(report["reboot"]["status"], "failed", "{report}");
}

/// Records of migrations under way in the source's state dir.
fn records_under_way(lab: &Lab) -> usize {
    std::fs::read_dir(lab.source_state_dir().join("migrations"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn parallel_2_runs_two_migrations_at_once() {
    let lab = TwoDestinations::new();
    let dst1 = lab.start_destination(&[]);
    let dst2 = lab.start_second_destination(&[]);
    let game1 = lab.start_container("game1", GAME);
    let game2 = lab.start_container("game2", GAME);
    // Not matched by --filter: stays, and is not in the report.
    let other = lab.start_container("other1", GAME);
    let before1 = wait_for_ticks(&game1, 3);
    let before2 = wait_for_ticks(&game2, 3);
    let before_other = wait_for_ticks(&other, 3);
    let other_pid = other.pid().unwrap();

    let mut args = lab.both().to_vec();
    args.extend(["--parallel", "2", "--filter", "game*"].map(String::from));
    let drain = lab.spawn_drain(&args);
    let done = AtomicBool::new(false);
    let most = AtomicUsize::new(0);
    let seen_frozen = AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                most.fetch_max(records_under_way(&lab), Ordering::SeqCst);
                if game1.frozen() || game2.frozen() {
                    seen_frozen.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let out = drain.output();
        done.store(true, Ordering::SeqCst);
        out
    });
    stderr(&out);
    let report = report(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    // Each migration keeps its record from before the freeze until both
    // sides settled: two at once means two migrations under way at once.
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "the migrations did not overlap"
    );
    let by_id = entries(&report);
    assert_eq!(
        by_id.keys().collect::<Vec<_>>(),
        ["game1", "game2"],
        "{report}"
    );
    assert_running_on_source_unchanged(&other, other_pid, &before_other);
    for (id, before) in [("game1", &before1), ("game2", &before2)] {
        let to = by_id[id]["destination"].as_str().unwrap();
        let dst = if to == first_destination() {
            &dst1
        } else {
            &dst2
        };
        assert_moved_with_state(dst, id, before);
    }
}

#[test]
fn cancel_stops_the_drain_between_containers() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let containers: Vec<SourceContainer> = ["game1", "game2", "game3"]
        .iter()
        .map(|id| lab.start_container(id, GAME))
        .collect();
    let befores: Vec<_> = containers.iter().map(|c| wait_for_ticks(c, 3)).collect();
    let pids: Vec<_> = containers.iter().map(|c| c.pid().unwrap()).collect();

    let drain = lab.spawn_drain(&["--to", &first_destination(), "--order", "name"]);
    wait_until(
        "game1's migration to start",
        Duration::from_secs(20),
        || lab.source_phase("game1").is_some(),
    );
    // One drain per state dir.
    let second = lab
        .drain_command(&["--to", &first_destination()])
        .output()
        .unwrap();
    let said = stderr(&second);
    assert_eq!(second.status.code(), Some(1), "{said}");
    assert!(said.contains("another drain"), "{said}");

    let cancel = lab.cancel_drain_command().output().unwrap();
    assert!(
        cancel.status.success(),
        "cancel failed:\n{}",
        stderr(&cancel)
    );

    let out = drain.output();
    stderr(&out);
    let report = report(&out);
    assert_eq!(out.status.code(), Some(5), "{report}");
    assert!(
        report["stopped"].as_str().unwrap().contains("SIGUSR1"),
        "{report}"
    );
    let by_id = entries(&report);
    // The migration under way finished; no new one started after the cancel.
    assert_eq!(by_id["game1"]["outcome"], "moved", "{report}");
    assert_moved_with_state(&dst, "game1", &befores[0]);
    let skipped: Vec<usize> = (1..3)
        .filter(|i| by_id[&containers[*i].id]["outcome"] == "skipped")
        .collect();
    assert!(!skipped.is_empty(), "the cancel stopped nothing: {report}");
    for i in skipped {
        let entry = &by_id[&containers[i].id];
        assert!(
            entry["reason"].as_str().unwrap().contains("not started"),
            "{entry}"
        );
        assert_running_on_source_unchanged(&containers[i], pids[i], &befores[i]);
    }
    assert!(!lab.source_state_dir().join("drain.pid").exists());
    // With no drain left, a cancel says so.
    let late = lab.cancel_drain_command().output().unwrap();
    assert_eq!(late.status.code(), Some(1));
    assert!(stderr(&late).contains("no drain is running"));
}

#[test]
fn a_failed_migration_stays_here_and_the_drain_goes_on() {
    let lab = TwoDestinations::new();
    // The first destination's copy of the layer lacks the file the game
    // holds open: its restore fails in CRIU, for real.
    lab.plant_layer_without("etc/game.conf");
    let dst1 = lab.start_destination(&[]);
    let dst2 = lab.start_second_destination(&[]);
    let games = [
        lab.start_container("game1", GAME),
        lab.start_container("game2", GAME),
    ];
    let befores: Vec<_> = games.iter().map(|c| wait_for_ticks(c, 3)).collect();
    let pids: Vec<_> = games.iter().map(|c| c.pid().unwrap()).collect();

    let out = lab.drain_command(&lab.both()).output().unwrap();
    stderr(&out);
    let report = report(&out);
    assert_eq!(out.status.code(), Some(5), "{report}");
    let by_id = entries(&report);
    let mut outcomes = Vec::new();
    for (i, game) in games.iter().enumerate() {
        let entry = &by_id[&game.id];
        outcomes.push(entry["outcome"].as_str().unwrap().to_owned());
        if entry["destination"] == first_destination() {
            assert_eq!(entry["outcome"], "failed", "{entry}");
            assert_eq!(entry["runs_on"], "source", "{entry}");
            let reason = entry["reason"].as_str().unwrap();
            assert!(
                reason.contains("the destination failed at restore"),
                "{reason}"
            );
            assert_running_on_source_unchanged(game, pids[i], &befores[i]);
            assert!(dst1.runc(&["state", &game.id]).stdout.is_empty());
        } else {
            assert_eq!(entry["outcome"], "moved", "{entry}");
            assert_moved_with_state(&dst2, &game.id, &befores[i]);
        }
    }
    outcomes.sort();
    assert_eq!(outcomes, ["failed", "moved"], "{report}");
}

#[test]
fn stop_on_error_starts_nothing_after_a_failure() {
    let lab = Lab::new();
    lab.plant_layer_without("etc/game.conf");
    let _dst = lab.start_destination(&[]);
    let games = [
        lab.start_container("game1", GAME),
        lab.start_container("game2", GAME),
    ];
    let befores: Vec<_> = games.iter().map(|c| wait_for_ticks(c, 3)).collect();
    let pids: Vec<_> = games.iter().map(|c| c.pid().unwrap()).collect();

    let out = lab
        .drain_command(&[
            "--to",
            &first_destination(),
            "--order",
            "name",
            "--stop-on-error",
        ])
        .output()
        .unwrap();
    stderr(&out);
    let report = report(&out);
    assert_eq!(out.status.code(), Some(1), "none moved: {report}");
    let by_id = entries(&report);
    assert_eq!(by_id["game1"]["outcome"], "failed", "{report}");
    assert_eq!(by_id["game2"]["outcome"], "skipped", "{report}");
    let reason = by_id["game2"]["reason"].as_str().unwrap();
    assert!(reason.contains("--stop-on-error"), "{reason}");
    assert!(
        report["stopped"]
            .as_str()
            .unwrap()
            .contains("--stop-on-error"),
        "{report}"
    );
    for (i, game) in games.iter().enumerate() {
        assert_running_on_source_unchanged(game, pids[i], &befores[i]);
    }
}

#[test]
fn sigterm_rolls_back_every_migration_under_way() {
    let lab = TwoDestinations::new();
    let dst1 = lab.start_destination(&[]);
    let dst2 = lab.start_second_destination(&[]);
    // Big enough that both are still sending when the signal comes.
    let script = format!("{}{GAME}", heap("256M", "0"));
    let games = [
        lab.start_container("heavy1", &script),
        lab.start_container("heavy2", &script),
    ];
    for game in &games {
        wait_for_heap(&game.rootfs);
    }
    let befores: Vec<_> = games.iter().map(|c| wait_for_ticks(c, 3)).collect();
    let pids: Vec<_> = games.iter().map(|c| c.pid().unwrap()).collect();

    let mut args = lab.both().to_vec();
    args.extend(["--parallel".into(), "2".into()]);
    let drain = lab.spawn_drain(&args);
    wait_until("both migrations to start", Duration::from_secs(30), || {
        records_under_way(&lab) == 2
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(drain.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = drain.output();
    stderr(&out);
    let report = report(&out);
    assert_eq!(out.status.code(), Some(1), "both roll back: {report}");
    assert!(
        report["stopped"].as_str().unwrap().contains("SIGTERM"),
        "{report}"
    );
    let by_id = entries(&report);
    for (i, game) in games.iter().enumerate() {
        let entry = &by_id[&game.id];
        assert_eq!(entry["outcome"], "failed", "{entry}");
        assert_eq!(entry["runs_on"], "source", "{entry}");
        let reason = entry["reason"].as_str().unwrap();
        assert!(reason.contains("interrupted by SIGTERM"), "{reason}");
        assert_running_on_source_unchanged(game, pids[i], &befores[i]);
        for dst in [&dst1, &dst2] {
            assert!(dst.runc(&["state", &game.id]).stdout.is_empty());
        }
    }
    assert_eq!(records_under_way(&lab), 0);
}

/// The command line `key=` of `[Service]` in a shipped unit.
fn unit_command(unit: &str, key: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/systemd")
        .join(unit);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut in_service = false;
    let mut found = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if let Some(value) = line.strip_prefix(&format!("{key}=")) {
            if in_service {
                found.push(value.to_owned());
            }
        }
    }
    assert_eq!(found.len(), 1, "{unit}: one {key}= expected: {found:?}");
    found.pop().unwrap()
}

/// An environment file's assignments (`KEY=value`, `KEY="value"`), as
/// systemd's EnvironmentFile= reads the ones it ships.
fn environment(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

/// `command` as systemd runs it: words split on whitespace, a word that is
/// `$NAME` replaced by the words of NAME's value, `${NAME}` by its value as
/// one word; `/usr/local/bin/` is the build directory.
fn expand(command: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let build = bin("migrate").parent().unwrap().display().to_string();
    let mut words = Vec::new();
    for word in command.split_whitespace() {
        if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
            let value = env
                .get(name)
                .unwrap_or_else(|| panic!("${name} is not set"));
            words.extend(value.split_whitespace().map(str::to_owned));
        } else {
            let mut word = word.replace("/usr/local/bin", &build);
            for (name, value) in env {
                word = word.replace(&format!("${{{name}}}"), value);
            }
            words.push(word);
        }
    }
    words
}

fn run_unit_command(lab: &Lab, argv: &[String]) -> Output {
    lab.hosts
        .on(&lab.hosts.src, Path::new(&argv[0]))
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_units_command_lines_drain() {
    let lab = TwoDestinations::new();
    let dst1 = lab.start_destination(&[]);
    let dst2 = lab.start_second_destination(&[]);
    let (script, marker) = reboot_script(&lab);
    // drain.env with this lab's values for what it ships.
    let options = [
        lab.both().to_vec(),
        vec!["--parallel".into(), "2".into()],
        lab.drain_lab_options(),
        vec!["--json".into()],
    ]
    .concat()
    .join(" ");
    let test_env = format!(
        "# drain.env for the lab\nMIGRATE_DRAIN_OPTIONS=\"{options}\"\n\
         MIGRATE_DRAIN_SCHEDULED_OPTIONS=\"--reboot --reboot-command={}\"\n",
        script.display()
    );
    let env = environment(&test_env);
    let shipped = environment(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/drain.env"),
        )
        .unwrap(),
    );
    assert_eq!(
        env.keys().collect::<Vec<_>>(),
        shipped.keys().collect::<Vec<_>>(),
        "the test's drain.env must set what the shipped one does"
    );
    let dst_of = |to: &str| {
        if to == first_destination() {
            &dst1
        } else {
            &dst2
        }
    };

    // The drain before a shutdown: ExecStop of migrate-drain-on-shutdown.
    let argv = expand(
        &unit_command("migrate-drain-on-shutdown.service", "ExecStop"),
        &env,
    );
    assert_eq!(argv[1], "drain", "{argv:?}");
    let a = lab.start_container("unit1", GAME);
    let b = lab.start_container("unit2", GAME);
    let (before_a, before_b) = (wait_for_ticks(&a, 2), wait_for_ticks(&b, 2));
    let out = run_unit_command(&lab, &argv);
    stderr(&out);
    let first = report(&out);
    assert_eq!(out.status.code(), Some(0), "{argv:?}: {first}");
    let by_id = entries(&first);
    for (id, before) in [("unit1", &before_a), ("unit2", &before_b)] {
        assert_eq!(by_id[id]["outcome"], "moved");
        assert_moved_with_state(
            dst_of(by_id[id]["destination"].as_str().unwrap()),
            id,
            before,
        );
    }
    assert!(!marker.exists(), "the shutdown drain must not reboot");

    // The timer's drain: ExecStart of migrate-drain.service, with --reboot.
    let argv = expand(&unit_command("migrate-drain.service", "ExecStart"), &env);
    let c = lab.start_container("unit3", GAME);
    let before_c = wait_for_ticks(&c, 2);
    let out = run_unit_command(&lab, &argv);
    stderr(&out);
    let second = report(&out);
    assert_eq!(out.status.code(), Some(0), "{argv:?}: {second}");
    let entry = &entries(&second)["unit3"];
    assert_eq!(entry["outcome"], "moved");
    assert_moved_with_state(
        dst_of(entry["destination"].as_str().unwrap()),
        "unit3",
        &before_c,
    );
    assert_eq!(second["reboot"]["status"], "rebooting", "{second}");
    assert!(marker.exists(), "the timer's drain did not reboot");
}

/// On a terminal a drain draws a bar of the containers done out of all,
/// with each migration's own progress under it; `script` gives it one.
#[test]
fn on_a_terminal_a_bar_counts_the_containers() {
    let lab = Lab::new();
    let dst = lab.start_destination(&[]);
    let game = lab.start_container("game1", GAME);
    let before = wait_for_ticks(&game, 3);

    let mut argv = vec![
        "nsenter".to_owned(),
        format!("--net=/run/netns/{}", lab.hosts.src),
        bin("migrate").to_str().unwrap().to_owned(),
        "drain".to_owned(),
    ];
    argv.extend(lab.drain_lab_options());
    argv.extend(["--to".to_owned(), first_destination()]);
    let line = argv
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let out = std::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{transcript}\n{}", stderr(&out));
    assert!(
        transcript.contains("drain [") && transcript.contains("/1 containers"),
        "no overall bar on the terminal:\n{transcript}"
    );
    assert!(
        transcript.contains("game1"),
        "no line for the migration:\n{transcript}"
    );
    assert!(
        transcript.contains('\u{1b}'),
        "drawn as plain lines, not as a bar:\n{transcript}"
    );
    assert_moved_with_state(&dst, "game1", &before);
}
