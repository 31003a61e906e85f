//! The destination daemon and a source-side client together, in-process on
//! loopback with freshly generated certificates; no root, CRIU or runc.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use migrate_common::certs::{create_ca, issue, TlsDir};
use migrate_common::criu::Criu;
use migrate_common::protocol::{Body, ControlChannel, Hello, LayerInfo, PROTOCOL_VERSION};
use migrate_common::runc::Runc;
use migrate_common::transport;
use migrate_dst::Daemon;

type Control = ControlChannel<quinn::SendStream>;

/// Connects to the daemon on `port` as the source would and opens the
/// control stream.
async fn connect(dir: &Path, port: u16) -> (quinn::Endpoint, quinn::Connection, Control) {
    let tls = TlsDir::load(&dir.join("src")).unwrap();
    let (endpoint, conn) = transport::connect(&format!("127.0.0.1:{port}"), &tls)
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (endpoint, conn, ControlChannel::new(recv, send))
}

async fn start_daemon(dir: &Path) -> (u16, tokio::task::JoinHandle<anyhow::Result<()>>) {
    create_ca(&dir.join("ca")).unwrap();
    issue(&dir.join("ca"), "127.0.0.1", &dir.join("dst")).unwrap();
    issue(&dir.join("ca"), "127.0.0.1", &dir.join("src")).unwrap();
    let endpoint = transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TlsDir::load(&dir.join("dst")).unwrap(),
    )
    .unwrap();
    let port = endpoint.local_addr().unwrap().port();
    // Tools that do not exist: this destination cannot restore anything.
    let daemon = Daemon::new(
        dir.join("state"),
        Runc::new("/nonexistent/runc", dir.join("runc"), None),
        Criu::new("/nonexistent/criu"),
        None,
    )
    .unwrap();
    (port, tokio::spawn(migrate_dst::serve_on(endpoint, daemon)))
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_reports_every_reason_and_claims_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (port, daemon) = start_daemon(dir.path()).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await;
    control
        .send(Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            container_id: "../escape".into(),
            config_json: "not json".into(),
            layers: vec![LayerInfo {
                digest: "b3:../../etc".into(),
                size_bytes: 1,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let reply = match control.recv().await.unwrap().body {
        Some(Body::PreflightReply(reply)) => reply,
        other => panic!("expected PreflightReply, got {other:?}"),
    };
    assert!(!reply.accepted);
    let all = reply.refusals.join("\n");
    for expected in [
        "protocol version",
        "not a valid container id",
        "CRIU is not usable",
        "runc is not usable",
        "config.json",
        "layer digest",
    ] {
        assert!(
            all.contains(expected),
            "no refusal mentions {expected:?}:\n{all}"
        );
    }
    assert!(reply.missing_layers.is_empty());
    // A refused migration leaves nothing behind, and nothing escaped.
    let containers = dir.path().join("state/containers");
    assert!(!containers.exists() || std::fs::read_dir(&containers).unwrap().next().is_none());
    assert!(!dir.path().join("escape").exists());

    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_message_ends_the_session_without_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (port, daemon) = start_daemon(dir.path()).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await;
    control
        .send(migrate_common::protocol::CheckpointSent::default())
        .await
        .unwrap();
    // The destination refuses to act on a checkpoint it never agreed to:
    // the stream ends with no message at all.
    assert!(control.recv().await.is_err());
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}
