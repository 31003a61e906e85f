//! The systemd units in contrib/systemd/, checked by `systemd-analyze
//! verify` with the built binaries in place of /usr/local/bin (verify
//! insists that every command a unit runs exists), and their environment
//! files against what the units read. Nothing is installed, enabled or run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use migrate_e2e::bin;

/// Where the units say the binaries are installed.
const INSTALLED: &str = "/usr/local/bin/";

fn contrib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/systemd")
        .canonicalize()
        .expect("contrib/systemd")
}

/// Every unit shipped, by file name.
fn units() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(contrib())
        .expect("listing contrib/systemd")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service") || n.ends_with(".timer"))
        .collect();
    names.sort();
    names
}

fn read(name: &str) -> String {
    std::fs::read_to_string(contrib().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The units rendered for the built binaries, in a directory of their own.
fn rendered() -> tempfile::TempDir {
    let build = bin("migrate");
    let build_dir = build.parent().expect("target dir");
    for binary in ["migrate", "migrate-dst"] {
        assert!(
            build_dir.join(binary).is_file(),
            "{} is not built: run `cargo build --workspace` first",
            build_dir.join(binary).display()
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for name in units() {
        let text = read(&name).replace(INSTALLED, &format!("{}/", build_dir.display()));
        std::fs::write(dir.path().join(&name), text).expect("writing a rendered unit");
    }
    dir
}

/// `KEY=value` assignments of `[section]` in a unit.
fn settings(unit: &str, section: &str, key: &str) -> Vec<String> {
    let mut in_section = false;
    let mut found = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == format!("[{section}]");
        } else if let Some(value) = line.strip_prefix(&format!("{key}=")) {
            if in_section {
                found.push(value.to_owned());
            }
        }
    }
    found
}

#[test]
fn systemd_analyze_verifies_every_unit() {
    let names = units();
    for expected in [
        "migrate-dst.service",
        "migrate-drain.service",
        "migrate-drain.timer",
        "migrate-drain-on-shutdown.service",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} is not shipped"
        );
    }
    let dir = rendered();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(names.iter().map(|n| dir.path().join(n)))
        .output()
        .expect("systemd-analyze (Debian: the systemd package; scripts/setup.sh installs it)");
    let said = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and the like are only warnings, exit 0: any word about
    // one of these units counts as a failure.
    let about_ours: Vec<&str> = said
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(n.as_str())))
        .collect();
    assert!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        out.status
    );
}

#[test]
fn the_timer_starts_a_shipped_service() {
    // verify does not check that a timer's unit exists.
    for timer in units().iter().filter(|n| n.ends_with(".timer")) {
        let targets = settings(&read(timer), "Timer", "Unit");
        assert_eq!(targets.len(), 1, "{timer}: one Unit= expected");
        assert!(
            units().contains(&targets[0]),
            "{timer} starts {}, not shipped",
            targets[0]
        );
    }
}

#[test]
fn the_shutdown_unit_drains_in_exec_stop_with_a_bound() {
    let unit = read("migrate-drain-on-shutdown.service");
    assert_eq!(settings(&unit, "Service", "Type"), ["oneshot"]);
    assert_eq!(settings(&unit, "Service", "RemainAfterExit"), ["yes"]);
    let stop = settings(&unit, "Service", "ExecStop");
    assert!(
        stop.len() == 1 && stop[0].starts_with(&format!("{INSTALLED}migrate drain ")),
        "{stop:?}"
    );
    assert!(settings(&unit, "Service", "ExecStart").is_empty());
    let bound = settings(&unit, "Service", "TimeoutStopSec");
    assert!(bound.len() == 1 && bound[0] != "infinity", "{bound:?}");
    let after = settings(&unit, "Unit", "After").join(" ");
    assert!(after.contains("network-online.target"), "{after}");
}

#[test]
fn stopping_the_daemon_leaves_its_children() {
    let unit = read("migrate-dst.service");
    assert_eq!(settings(&unit, "Service", "KillMode"), ["process"]);
    assert_eq!(settings(&unit, "Service", "Restart"), ["on-failure"]);
}

/// `$NAME` and `${NAME}` in a command line.
fn variables(command: &str) -> BTreeSet<String> {
    command
        .split('$')
        .skip(1)
        .map(|rest| {
            rest.trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn environment_files_set_what_the_units_read() {
    for name in units() {
        let unit = read(&name);
        let Some(file) = settings(&unit, "Service", "EnvironmentFile").pop() else {
            continue;
        };
        let shipped = Path::new(file.trim_start_matches('-'))
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        let env = read(&shipped);
        let defined: BTreeSet<String> = env
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
            .collect();
        for key in ["ExecStart", "ExecStop"] {
            for command in settings(&unit, "Service", key) {
                for var in variables(&command) {
                    assert!(
                        defined.contains(&var),
                        "{name} reads ${var}, which {shipped} does not set"
                    );
                }
            }
        }
    }
}

#[test]
fn the_daemon_accepts_its_environment_file() {
    // What migrate-dst.service runs, with dst.env's values: it gets past
    // parsing its arguments (exit 2 would be a usage error) and stops at the
    // missing TLS material.
    let env = read("dst.env");
    let value = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("dst.env sets no {key}"))
            .trim_matches('"')
            .to_owned()
    };
    let out = Command::new(bin("migrate-dst"))
        .arg("--listen")
        .arg(value("MIGRATE_DST_LISTEN"))
        .args(value("MIGRATE_DST_OPTIONS").split_whitespace())
        .args([
            "--tls-dir",
            "/nonexistent/migrate-tls",
            "--state-dir",
            "/nonexistent/migrate-dst",
        ])
        .output()
        .expect("running migrate-dst");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("loading TLS material"), "{said}");
}
