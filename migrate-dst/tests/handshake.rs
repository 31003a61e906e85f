//! A source that claims a protocol version this destination does not speak is
//! refused in the handshake, in words that name both versions; in-process on
//! loopback with freshly generated certificates.

#![allow(clippy::unwrap_used)]

mod support;

use migrate_common::protocol::{Hello, PROTOCOL_VERSION};
use support::{connect, preflight, start_daemon, Setup};

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_protocol_version_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let (port, daemon) = start_daemon(path, Setup::default()).await;

    for forged in [0, PROTOCOL_VERSION + 1, u32::MAX] {
        let (client, conn, mut control) = connect(path, port).await.unwrap();
        let reply = preflight(
            &mut control,
            Hello {
                protocol_version: forged,
                container_id: "forged".into(),
                ..Default::default()
            },
        )
        .await;
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
