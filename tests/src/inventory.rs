//! Helpers for the operator commands' tests (`tests/tests/inventory.rs`):
//! `migrate ps`, `status` and `cancel` on the source, `migrate-dst gc` on
//! the destination, and a container removed from the destination the way
//! an operator would.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::{bin, unmount_under, Destination, Lab};

/// `migrate <args>` on the source, with the lab's records.
pub fn migrate_cli(lab: &Lab, args: &[&str]) -> Output {
    Command::new(bin("migrate"))
        .args(args)
        .arg("--state-dir")
        .arg(lab.source_state_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `migrate-dst gc <args>` on the destination's state dir.
pub fn gc(dst: &Destination, args: &[&str]) -> Output {
    Command::new(bin("migrate-dst"))
        .arg("gc")
        .arg("--state-dir")
        .arg(&dst.state_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The JSON object a command printed; panics with what it said otherwise.
pub fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Deletes container `id` on the destination and removes its dir, as an
/// operator does once it is no longer wanted there (the daemon's next start
/// removes the dir of a container runc no longer knows).
pub fn remove_on_destination(dst: &Destination, id: &str) {
    let out = dst.runc(&["delete", "--force", id]);
    assert!(out.status.success(), "runc delete {id}: {out:?}");
    let dir = dst.container_dir(id);
    unmount_under(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Makes a directory that looks like a layer no container uses, under
/// `digest` (`b3:` and 64 hex digits), in the destination's store.
pub fn plant_unused_layer(dst: &Destination, digest: &str) {
    let dir = dst.state_dir.join("layers").join(digest);
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/unused"), b"nobody uses this").unwrap();
}

pub fn store_has(dst: &Destination, digest: &str) -> bool {
    dst.state_dir.join("layers").join(digest).is_dir()
}

/// The digest a layer directory has, as both hosts compute it.
pub fn digest_of(layer: &Path) -> String {
    migrate_common::rootfs::digest::layer_digest(layer)
        .unwrap()
        .to_string()
}
