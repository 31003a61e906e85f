//! The daemon's preflight over loopback: every reason at once, and a claim
//! on nothing but a valid id.

#![allow(clippy::unwrap_used)]

mod support;

use migrate_common::protocol::{
    CheckpointSent, Hello, LayerInfo, MAX_CPUINFO_BYTES, PROTOCOL_VERSION,
};
use support::{connect, hello, preflight, runc_spec, start_daemon, Setup};

#[tokio::test(flavor = "multi_thread")]
async fn preflight_reports_every_reason_and_claims_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (port, daemon) = start_daemon(dir.path(), Setup::default()).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let reply = preflight(
        &mut control,
        Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            container_id: "../escape".into(),
            config_json: "not json".into(),
            layers: vec![LayerInfo {
                digest: "b3:../../etc".into(),
                size_bytes: 1,
            }],
            criu_options: vec!["file-locks".into(), "leave-running".into()],
            ..Default::default()
        },
    )
    .await;
    assert!(!reply.accepted);
    let all = reply.refusals.join("\n");
    for expected in [
        "protocol version",
        "not a valid container id",
        "CRIU is not usable",
        "runc is not usable",
        "config.json",
        "memory mode 0",
        "layer digest",
        "CRIU option \"leave-running\"",
    ] {
        assert!(
            all.contains(expected),
            "no refusal mentions {expected:?}:\n{all}"
        );
    }
    assert!(reply.missing_layers.is_empty());
    // A refused migration leaves nothing behind.
    let containers = dir.path().join("state/containers");
    assert!(!containers.exists() || std::fs::read_dir(&containers).unwrap().next().is_none());

    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}

/// With tools that pass every check, a valid id is claimed: so an id that
/// escapes the state dir would be too, were it not refused.
#[tokio::test(flavor = "multi_thread")]
async fn only_a_valid_id_is_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        working_tools: true,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    let config = runc_spec().to_string();

    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let reply = preflight(&mut control, hello("../escape", &config)).await;
    assert_eq!(
        reply.refusals,
        ["\"../escape\" is not a valid container id"],
        "{reply:?}"
    );
    // Where `<state>/containers/../escape` would be.
    assert!(!dir.path().join("state/escape").exists());
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;

    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let layer = format!("b3:{}", "0".repeat(64));
    let with_layer = Hello {
        layers: vec![LayerInfo {
            digest: layer.clone(),
            size_bytes: 1,
        }],
        ..hello("web1", &config)
    };
    let reply = preflight(&mut control, with_layer).await;
    assert!(reply.accepted, "{reply:?}");
    assert!(dir.path().join("state/containers/web1").is_dir());
    // The claim names the container's layers, the missing one too, so that
    // garbage collection keeps them.
    assert_eq!(reply.missing_layers, std::slice::from_ref(&layer));
    let layers: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("state/containers/web1/layers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(layers["layers"], serde_json::json!([layer]));
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}

/// A preflight alone gets the verdict and the host's room, and claims
/// nothing: the same id is then accepted, and claimed, by a migration.
#[tokio::test(flavor = "multi_thread")]
async fn a_preflight_alone_claims_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        working_tools: true,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    let config = runc_spec().to_string();

    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let question = Hello {
        preflight_only: true,
        ..hello("web1", &config)
    };
    let reply = preflight(&mut control, question).await;
    assert!(reply.accepted, "{reply:?}");
    assert!(reply.mem_available_bytes > 0, "{reply:?}");
    assert!(reply.free_bytes > 0, "{reply:?}");
    // The exchange is over: the destination closes its side.
    assert!(control.recv().await.is_err(), "the exchange went on");
    assert!(!dir.path().join("state/containers/web1").exists());
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;

    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let reply = preflight(&mut control, hello("web1", &config)).await;
    assert!(reply.accepted, "{reply:?}");
    assert!(dir.path().join("state/containers/web1").is_dir());
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}

/// A container bigger than the memory the destination has available is
/// refused before anything moves.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_bigger_than_available_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        working_tools: true,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let question = Hello {
        memory_bytes: u64::MAX / 4,
        preflight_only: true,
        ..hello("web1", &runc_spec().to_string())
    };
    let reply = preflight(&mut control, question).await;
    assert!(!reply.accepted);
    assert!(
        reply.refusals.iter().any(|r| r.contains("available")),
        "{reply:?}"
    );
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}

/// Every check leaves an item, in a fixed order; a check that passed says
/// what it found.
#[tokio::test(flavor = "multi_thread")]
async fn every_check_leaves_an_item_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        working_tools: true,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let question = Hello {
        preflight_only: true,
        ..hello("web1", &runc_spec().to_string())
    };
    let reply = preflight(&mut control, question).await;
    assert!(reply.accepted, "{reply:#?}");
    let names: Vec<&str> = reply.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "protocol",
            "container id",
            "criu version",
            "criu features",
            "criu options",
            "cpu",
            "runc",
            "existing container",
            "policy",
            "bind sources",
            "cgroup",
            "layers",
            "disk",
            "image space",
            "memory",
        ]
    );
    assert!(
        reply.checks.iter().all(|c| c.ok && !c.detail.is_empty()),
        "{reply:#?}"
    );
    let cpu = &reply.checks[5];
    assert_eq!(
        cpu.detail, "not checked (the source sent no cpuinfo image)",
        "an old source sends none"
    );
    let images = &reply.checks[13];
    assert!(
        images.detail.contains("/dev/shm/migrate-dst-test.")
            && images.detail.contains("the migration's images need about"),
        "the image space item names the image dir: {images:?}"
    );
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}

/// A cpuinfo image beyond the bound is refused without being written.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_cpuinfo_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        working_tools: true,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let question = Hello {
        cpuinfo: vec![0; MAX_CPUINFO_BYTES + 1],
        preflight_only: true,
        ..hello("web1", &runc_spec().to_string())
    };
    let reply = preflight(&mut control, question).await;
    assert!(!reply.accepted);
    let cpu = reply.checks.iter().find(|c| c.name == "cpu").unwrap();
    assert!(
        !cpu.ok && cpu.detail.contains("more than the 65536"),
        "{cpu:?}"
    );
    assert_eq!(reply.refusals, std::slice::from_ref(&cpu.detail));
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_message_ends_the_session_without_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (port, daemon) = start_daemon(dir.path(), Setup::default()).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    control.send(CheckpointSent::default()).await.unwrap();
    // The destination refuses to act on a checkpoint it never agreed to:
    // the stream ends with no message at all.
    assert!(control.recv().await.is_err());
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}
