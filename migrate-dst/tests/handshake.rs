//! A source that claims a protocol version this destination does not speak is
//! refused in the handshake, in words that name both versions; in-process on
//! loopback with freshly generated certificates.

#![allow(clippy::unwrap_used)]

use migrate_common::certs::{create_ca, issue, TlsDir};
use migrate_common::criu::Criu;
use migrate_common::protocol::{Body, ControlChannel, Hello, PROTOCOL_VERSION};
use migrate_common::runc::Runc;
use migrate_common::transport;
use migrate_dst::Daemon;

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_protocol_version_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    create_ca(&path.join("ca")).unwrap();
    issue(&path.join("ca"), "127.0.0.1", &path.join("dst")).unwrap();
    issue(&path.join("ca"), "127.0.0.1", &path.join("src")).unwrap();
    let endpoint = transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TlsDir::load(&path.join("dst")).unwrap(),
    )
    .unwrap();
    let port = endpoint.local_addr().unwrap().port();
    let daemon = Daemon::new(
        path.join("state"),
        Runc::new("/nonexistent/runc", path.join("runc"), None),
        Criu::new("/nonexistent/criu"),
        None,
    )
    .unwrap();
    let daemon = tokio::spawn(migrate_dst::serve_on(endpoint, daemon));
    let tls = TlsDir::load(&path.join("src")).unwrap();

    for forged in [0, PROTOCOL_VERSION + 1, u32::MAX] {
        let (client, conn) = transport::connect(&format!("127.0.0.1:{port}"), &tls)
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut control = ControlChannel::new(recv, send);
        control
            .send(Hello {
                protocol_version: forged,
                container_id: "forged".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let reply = match control.recv().await.unwrap().body {
            Some(Body::PreflightReply(reply)) => reply,
            other => panic!("expected PreflightReply, got {other:?}"),
        };
        assert!(!reply.accepted);
        let refusal = reply
            .refusals
            .iter()
            .find(|r| r.contains("protocol version"))
            .unwrap_or_else(|| panic!("no refusal names the version: {:?}", reply.refusals));
        for version in [forged, PROTOCOL_VERSION] {
            assert!(
                refusal.contains(&version.to_string()),
                "{refusal:?} does not name version {version}"
            );
        }
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
    }
    // Nothing was claimed for any of them.
    let containers = path.join("state/containers");
    assert!(!containers.exists() || std::fs::read_dir(&containers).unwrap().next().is_none());
    daemon.abort();
}
