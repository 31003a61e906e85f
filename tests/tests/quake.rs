//! The DockerCon 2015 demo, without the terminal display
//! (`scripts/demo-quake.sh` shows it): an ioquake3 server with OpenArena's
//! data and four bots playing, in a container on the network test bed's
//! bridge, moved with `--mode post-copy` while a player's machine on the
//! segment polls its status. After the move: the same map and bots, every
//! score where it was or above and the scores still rising, a cvar set over
//! rcon before the move still set (only the same process has it), and
//! nothing of the container left on the source. Run as root, one at a time.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use migrate_e2e::checks::{assert_work_dir_clean, stderr};
use migrate_e2e::quake::{self, add_player_addresses, cvar, is_fresh, map, scores, total, Watcher};
use migrate_e2e::segment::{DestinationBridge, BRIDGE, CONTAINER_ADDR};
use migrate_e2e::{mounts_under, Lab};
use serde_json::Value;

/// The bots of `QUAKE_BOTS` in `scripts/lib/quake.sh`, sorted.
const BOTS: [&str; 4] = ["Grism", "Kyonshi", "Major", "Sarge"];
/// Frags before the move: enough that a restarted game (scores back to
/// zero) could not pass for this one.
const FRAGS_BEFORE: i64 = 4;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn a_quake_server_moves_with_post_copy_and_the_game_goes_on() {
    let lab = Lab::new();
    let segment = lab.segment(DestinationBridge::Same);
    add_player_addresses(&segment);
    let dst = lab.start_destination(&["--allow-bridge", BRIDGE]);
    let layer = lab.path("quake-layer");
    let args = quake::server(&layer);
    let container = lab.start_container_on("q3", &[layer, lab.layer.clone()], &args, &[]);
    let _nic = segment.attach(container.pid().unwrap());
    segment.wait_reachable(CONTAINER_ADDR);

    let watcher = Watcher::start(&lab, &segment);
    let playing = watcher.wait_for(
        "the bots to play and score",
        Duration::from_secs(120),
        |l| scores(l).len() == BOTS.len() && total(l) >= FRAGS_BEFORE,
    );
    assert_eq!(
        scores(&playing)
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        BOTS,
        "{playing}"
    );
    let game_map = map(&playing).to_owned();
    let map_started = playing["status"]["info"]["g_timestamp"].clone();
    // Only this process can know it: set at run time, in its memory.
    let token = format!("m{}", unix_ms());
    assert_eq!(
        cvar(&segment, "migrate_token", Some(&token)).unwrap(),
        token
    );

    let before = watcher.lines().into_iter().rev().find(is_fresh).unwrap();
    let out = lab.migrate(&container, &["--mode", "post-copy"]);
    assert!(out.status.success(), "migrate failed:\n{}", stderr(&out));
    let ended_ms = unix_ms();
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["mode"]["used"], "post-copy", "{summary}");

    // The first answer after the move, then a later one with more frags.
    let after = watcher.wait_for(
        "the server to answer from the destination",
        Duration::from_secs(30),
        |l| l["unix_ms"].as_u64().unwrap() > ended_ms,
    );
    assert_eq!(map(&after), game_map, "{after}");
    assert_eq!(
        after["status"]["info"]["g_timestamp"], map_started,
        "the map was restarted: {after}"
    );
    let (was, now) = (scores(&before), scores(&after));
    assert_eq!(
        was.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        now.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "other players after the move: {before} then {after}"
    );
    // A bot's score drops by one when it kills itself (lava, its own
    // rocket); a game started again would have dropped every score to 0.
    for ((name, score_was), (_, score_now)) in was.iter().zip(&now) {
        assert!(
            score_now >= &(score_was - 1),
            "{name}'s score went from {score_was} to {score_now}: {before} then {after}"
        );
    }
    let rising = watcher.wait_for("the scores to go on rising", Duration::from_secs(90), |l| {
        total(l) >= total(&after) + 2
    });
    assert_eq!(map(&rising), game_map);
    assert_eq!(cvar(&segment, "migrate_token", None).unwrap(), token);

    let watched = watcher.stop();
    eprintln!(
        "migrate's downtime {} ms; the scoreboard went {} ms without an answer; \
         frags {} before the move, {} after it, {} later",
        summary["downtime_ms"],
        watched["longest_gap_ms"],
        total(&before),
        total(&after),
        total(&rising)
    );

    // Nothing of it left on the source.
    assert!(
        container.state().is_none(),
        "still registered on the source"
    );
    assert!(mounts_under(&container.runc_root).is_empty());
    assert!(
        segment.bridge_ports(&segment.src) == [segment.uplink.clone()],
        "a port of the container is left on the source's bridge: {:?}",
        segment.bridge_ports(&segment.src)
    );
    assert_work_dir_clean(&lab);
    let state: Value = serde_json::from_slice(&dst.runc(&["state", "q3"]).stdout).unwrap();
    assert_eq!(state["status"], "running", "{state}");
}
