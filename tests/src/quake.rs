//! What the Quake test (`tests/tests/quake.rs`) adds to the network test
//! bed: the game server's layer and command line, from the same shell
//! library the demo uses (`scripts/lib/quake.sh`), and a player's machine
//! on the segment that watches the scoreboard and talks to the server's
//! console with `quake-status`.
//!
//! The player's machine is the segment's client namespace with ten more
//! addresses: ioquake3 answers one address's status queries (and rcon) at
//! most once a second after a burst of ten, so the watcher polls every
//! 100 ms from those ten in turn and rcon goes from the client's own.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::segment::{Segment, CONTAINER_ADDR, PREFIX_LEN};
use crate::{bin, sh, wait_until, Lab};

/// `QUAKE_PORT` and `QUAKE_RCON_PASSWORD` of `scripts/lib/quake.sh`.
pub const PORT: u16 = 27960;
pub const RCON_PASSWORD: &str = "migrate-demo";

/// The addresses the watcher asks from, besides the client's own (which
/// rcon uses: it shares the rate limit of an address's status queries).
pub const WATCH_ADDRS: [&str; 10] = [
    "10.77.0.101",
    "10.77.0.102",
    "10.77.0.103",
    "10.77.0.104",
    "10.77.0.105",
    "10.77.0.106",
    "10.77.0.107",
    "10.77.0.108",
    "10.77.0.109",
    "10.77.0.110",
];

fn library() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib/quake.sh")
}

/// Runs `function args...` of the shell library.
fn call(function: &str, args: &[&Path]) -> String {
    sh(Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; . \"$0\"; {function} \"$@\""))
        .arg(library())
        .args(args))
}

/// Fails the test unless the game is installed: `scripts/test.sh` installs
/// it (`install_quake` of the shell library).
pub fn require_quake() {
    for path in [
        "/usr/lib/ioquake3/ioq3ded",
        "/usr/lib/openarena-server/baseoa/qagamex86_64.so",
        "/usr/share/games/openarena/baseoa",
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: install ioquake3-server and openarena-server \
             (scripts/test.sh does, with install_quake of scripts/lib/quake.sh)"
        );
    }
    assert!(
        bin("quake-status").exists(),
        "quake-status is missing: run `cargo build --workspace` first"
    );
}

/// Makes the server's layer in `dir`; returns its command line.
pub fn server(dir: &Path) -> Vec<String> {
    require_quake();
    call("make_quake_layer", &[dir]);
    call("quake_server_args", &[])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The server's address on the segment.
pub fn server_addr() -> String {
    format!("{CONTAINER_ADDR}:{PORT}")
}

/// Gives the segment's client the [`WATCH_ADDRS`] (they go with its
/// namespace).
pub fn add_player_addresses(segment: &Segment) {
    for addr in WATCH_ADDRS {
        sh(Command::new("ip").args([
            "-n",
            &segment.client,
            "addr",
            "add",
            &format!("{addr}/{PREFIX_LEN}"),
            "dev",
            "eth0",
        ]));
    }
}

/// `quake-status` with `args`, run on the player's machine.
pub fn quake_status(segment: &Segment, args: &[&str]) -> std::process::Output {
    segment
        .on_client(&bin("quake-status"))
        .args(args)
        .output()
        .unwrap()
}

/// The value of the server's cvar `name` over rcon, set to `set` first if
/// given; or why there was none.
pub fn cvar(segment: &Segment, name: &str, set: Option<&str>) -> Result<String, String> {
    let addr = server_addr();
    let mut args = vec!["cvar", &addr, "--password", RCON_PASSWORD];
    if let Some(value) = set {
        args.extend(["--set", value]);
    }
    args.push(name);
    answered(quake_status(segment, &args)).map(|v| v.trim().to_owned())
}

fn answered(out: std::process::Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `quake-status watch --json` on the player's machine, polling every
/// 100 ms from [`WATCH_ADDRS`] and writing a line a second to a file;
/// stopped through its stop file, killed (by its pid) on drop.
#[derive(Debug)]
pub struct Watcher {
    child: Option<Child>,
    output: PathBuf,
    stop_file: PathBuf,
}

impl Watcher {
    pub fn start(lab: &Lab, segment: &Segment) -> Self {
        let output = lab.path("scoreboard.jsonl");
        let stop_file = lab.path("scoreboard.stop");
        let addr = server_addr();
        let mut cmd = segment.on_client(&bin("quake-status"));
        cmd.args(["watch", &addr, "--json", "--poll", "100ms", "--show", "1s"])
            .arg("--stop-file")
            .arg(&stop_file);
        for from in WATCH_ADDRS {
            cmd.args(["--from", from]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&output).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            output,
            stop_file,
        }
    }

    /// The lines shown so far (the last one may be half written: left out).
    pub fn lines(&self) -> Vec<Value> {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.output) {
            let _ = f.read_to_string(&mut text);
        }
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits up to `timeout` for a line shown on a fresh answer (less than
    /// 300 ms old) that satisfies `cond`; returns it.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut found = None;
        wait_until(what, timeout, || {
            found = self
                .lines()
                .into_iter()
                .rev()
                .find(|l| is_fresh(l) && cond(l));
            found.is_some()
        });
        found.unwrap()
    }

    /// Stops the watcher; returns its summary.
    pub fn stop(mut self) -> Value {
        std::fs::write(&self.stop_file, b"").unwrap();
        let status = self.child.take().unwrap().wait().unwrap();
        assert!(status.success(), "quake-status watch failed: {status}");
        let last = self.lines().pop().unwrap_or_default();
        assert!(last["summary"].is_object(), "no summary: {last}");
        last["summary"].clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a shown line carries an answer less than 300 ms old.
pub fn is_fresh(line: &Value) -> bool {
    line["silent_ms"].as_u64().is_some_and(|ms| ms < 300) && line["status"].is_object()
}

/// The scoreboard of a shown line: (name, score), sorted by name.
pub fn scores(line: &Value) -> Vec<(String, i64)> {
    let mut scores: Vec<(String, i64)> = line["status"]["players"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["score"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    scores.sort();
    scores
}

/// The sum of the scores of a shown line.
pub fn total(line: &Value) -> i64 {
    scores(line).iter().map(|(_, s)| s).sum()
}

/// The map of a shown line.
pub fn map(line: &Value) -> &str {
    line["status"]["info"]["mapname"].as_str().unwrap_or("")
}
