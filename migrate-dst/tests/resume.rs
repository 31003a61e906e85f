//! A `Resume` for a migration the destination does not hold is answered,
//! not dropped: the source (a new `migrate` settling an earlier run, or
//! `migrate resolve`) must learn that nothing is held.

#![allow(clippy::unwrap_used)]

mod support;

use migrate_common::protocol::{Body, Resume, PROTOCOL_VERSION};
use support::{connect, start_daemon, Setup};

#[tokio::test(flavor = "multi_thread")]
async fn resuming_what_is_not_held_is_refused_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let (port, daemon) = start_daemon(dir.path(), Setup::default()).await;
    for (migration_id, container_id) in [("m-unknown", "web1"), ("", "web1")] {
        let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
        control
            .send(Resume {
                protocol_version: PROTOCOL_VERSION,
                migration_id: migration_id.into(),
                tunnel_delivered: 0,
                container_id: container_id.into(),
            })
            .await
            .unwrap();
        match control.recv().await.unwrap().body {
            Some(Body::Failed(failed)) => {
                assert_eq!(failed.stage, "resume");
                assert!(
                    failed
                        .message
                        .contains("no migration of that id is held here"),
                    "{failed:?}"
                );
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    }
    daemon.abort();
}
