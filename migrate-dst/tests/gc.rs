//! Layer store garbage collection in process, without root: what is in use
//! stays, what is not goes, and a preflight holding the store's lock keeps
//! a collection from removing a layer it found.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use migrate_common::rootfs::digest::LayerDigest;
use migrate_dst::gc::{self, GcError, Limits, Reason};
use migrate_dst::restore::ContainerDir;
use migrate_dst::store::LayerStore;

fn digest(c: char) -> LayerDigest {
    LayerDigest::parse(&format!("b3:{}", c.to_string().repeat(64))).unwrap()
}

/// A store under `state` with layers `a`, `b` and `c`, `bytes` each.
fn store_with_layers(state: &Path, bytes: usize) -> LayerStore {
    let store = LayerStore::open(state.join("layers")).unwrap();
    for c in ['a', 'b', 'c'] {
        let dir = store.path(&digest(c));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/data"), vec![b'x'; bytes]).unwrap();
    }
    store
}

fn container_using(state: &Path, store: &LayerStore, id: &str, layers: &[char]) -> ContainerDir {
    let dir = ContainerDir {
        root: state.join("containers").join(id),
    };
    std::fs::create_dir_all(&dir.root).unwrap();
    let layers: Vec<_> = layers.iter().map(|&c| digest(c)).collect();
    gc::record_use(store, &dir, &layers).unwrap();
    dir
}

fn present(store: &LayerStore) -> Vec<String> {
    store
        .list()
        .unwrap()
        .iter()
        .map(|d| d.as_str()[3..4].to_owned())
        .collect()
}

#[test]
fn unused_layers_go_and_used_ones_stay() {
    let state = tempfile::tempdir().unwrap();
    let store = store_with_layers(state.path(), 10);
    container_using(state.path(), &store, "web", &['a']);
    container_using(state.path(), &store, "db", &['a', 'c']);

    let dry = gc::collect(&store, state.path(), &Limits::default(), true).unwrap();
    assert_eq!(dry.removed.len(), 1);
    assert_eq!(dry.removed[0].digest, digest('b').to_string());
    assert_eq!(
        present(&store),
        ["a", "b", "c"],
        "a dry run removes nothing"
    );

    let report = gc::collect(&store, state.path(), &Limits::default(), false).unwrap();
    assert_eq!(report.removed[0].reason, Reason::Unused);
    assert_eq!(report.layers_in_use, 2);
    assert_eq!(present(&store), ["a", "c"]);
    let leftovers: Vec<_> = std::fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".removing-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The container goes: so does the reference.
    std::fs::remove_dir_all(state.path().join("containers/db")).unwrap();
    gc::collect(&store, state.path(), &Limits::default(), false).unwrap();
    assert_eq!(present(&store), ["a"]);
}

#[test]
fn limits_remove_the_least_recently_used_unused_layers_only() {
    let state = tempfile::tempdir().unwrap();
    let store = store_with_layers(state.path(), 4096);
    // "b" was used by a migration long ago, "c" just now; neither is used
    // by a container any more. "a" is.
    let long_ago = SystemTime::now() - Duration::from_secs(3 * 86400);
    store.touch(&digest('b')).unwrap();
    std::fs::File::options()
        .write(true)
        .open(state.path().join("layers.used").join(digest('b').as_str()))
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    container_using(state.path(), &store, "web", &['a']);
    store.touch(&digest('c')).unwrap();

    let by_age = Limits {
        max_bytes: None,
        max_age: Some(Duration::from_secs(86400)),
    };
    let report = gc::collect(&store, state.path(), &by_age, false).unwrap();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert_eq!(report.removed[0].reason, Reason::TooOld);
    assert!(report.removed[0].unused_s >= 3 * 86400 - 5);
    assert_eq!(present(&store), ["a", "c"]);

    let by_size = Limits {
        max_bytes: Some(1),
        max_age: None,
    };
    let report = gc::collect(&store, state.path(), &by_size, false).unwrap();
    assert_eq!(report.removed[0].reason, Reason::OverSize);
    assert_eq!(
        present(&store),
        ["a"],
        "a layer in use stays over the limit"
    );
}

#[test]
fn a_collection_waits_for_a_preflight_holding_the_store() {
    let state = tempfile::tempdir().unwrap();
    let store = store_with_layers(state.path(), 10);
    // A preflight found "b" and has not yet written its container's
    // layers.json.
    let held = store.lock_shared().unwrap();
    let collector = std::thread::spawn({
        let state = state.path().to_owned();
        move || {
            let store = LayerStore::open(state.join("layers")).unwrap();
            gc::collect(&store, &state, &Limits::default(), false).unwrap()
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(present(&store), ["a", "b", "c"]);
    container_using(state.path(), &store, "web", &['b']);
    drop(held);
    let report = collector.join().unwrap();
    assert_eq!(report.removed.len(), 2);
    assert_eq!(present(&store), ["b"]);
}

#[test]
fn an_unreadable_layers_file_stops_the_collection() {
    let state = tempfile::tempdir().unwrap();
    let store = store_with_layers(state.path(), 10);
    let dir = container_using(state.path(), &store, "web", &['a']);
    std::fs::write(dir.layers(), "{\"layers\": [").unwrap();
    let err = gc::collect(&store, state.path(), &Limits::default(), false).unwrap_err();
    assert!(matches!(err, GcError::Unreadable { .. }), "{err}");
    assert_eq!(present(&store), ["a", "b", "c"]);
}

#[test]
fn a_collection_interrupted_after_taking_a_layer_out_is_finished_at_start() {
    let state = tempfile::tempdir().unwrap();
    let store = store_with_layers(state.path(), 10);
    let aside = store.take_out(&digest('b')).unwrap();
    assert!(!store.has(&digest('b')));
    store.remove_incomplete().unwrap();
    assert!(!aside.exists());
    assert_eq!(present(&store), ["a", "c"]);
}
