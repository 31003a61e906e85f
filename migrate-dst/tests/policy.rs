//! The destination's policy over loopback: who may push containers
//! (`--allow`), with which certificates, and what a received container may
//! do (`--allow-bind`, `--allow-privileged`).

#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use migrate_common::certs::{CertError, Role, TlsDir};
use migrate_common::policy::Policy;
use migrate_common::protocol::{Body, Resume, PROTOCOL_VERSION};
use migrate_common::transport;
use serde_json::json;
use support::{allowing, connect, hello, preflight, runc_spec, start_daemon, Setup, SOURCE};

#[tokio::test(flavor = "multi_thread")]
async fn a_source_not_allowed_is_refused_and_told_why() {
    for (allowed, says) in [
        (&[][..], "it allows no source yet"),
        (&["other.example"][..], "it allows other.example"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup {
            policy: allowing(allowed),
            working_tools: true,
            ..Setup::default()
        };
        let (port, daemon) = start_daemon(dir.path(), setup).await;

        let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
        let reply = preflight(&mut control, hello("web1", &runc_spec().to_string())).await;
        assert!(!reply.accepted);
        assert_eq!(reply.refusals.len(), 1, "{reply:?}");
        let refusal = &reply.refusals[0];
        assert!(
            refusal.contains(&format!("does not allow source {SOURCE}")),
            "{refusal}"
        );
        assert!(refusal.contains(says), "{refusal}");
        assert!(refusal.contains(&format!("--allow {SOURCE}")), "{refusal}");
        // Refused before anything else: nothing about this host, no claim.
        assert!(reply.hostname.is_empty() && reply.criu_version.is_empty());
        assert!(!dir.path().join("state/containers/web1").exists());
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;

        // Nor can it take over a migration under way.
        let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
        control
            .send(Resume {
                protocol_version: PROTOCOL_VERSION,
                migration_id: "m1".into(),
                tunnel_delivered: 0,
                container_id: String::new(),
            })
            .await
            .unwrap();
        match control.recv().await.unwrap().body {
            Some(Body::Failed(failed)) => {
                assert!(
                    failed.message.contains("does not allow source"),
                    "{failed:?}"
                )
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        daemon.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_without_client_auth_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        src_role: Role::Destination,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    // TLS 1.3 lets the client finish first: the destination's refusal,
    // with its reason, then ends the connection.
    let tls = TlsDir::load(&dir.path().join("src")).unwrap();
    let (endpoint, conn) = transport::connect(&format!("127.0.0.1:{port}"), &tls)
        .await
        .unwrap();
    let reason = conn.closed().await.to_string();
    assert!(
        reason.contains(&format!(
            "the destination refuses the source's certificate for {SOURCE}: it is not for \
             client authentication (clientAuth)"
        )),
        "{reason}"
    );
    assert!(reason.contains("--role source"), "{reason}");
    endpoint.wait_idle().await;
    daemon.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_certificate_without_server_auth_is_refused_by_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        dst_role: Role::Source,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    let err = connect(dir.path(), port).await.unwrap_err();
    let message = format!("{:#}", anyhow::Error::from(err));
    assert!(
        message.contains(
            "the source refuses the destination's certificate for 127.0.0.1: it is not for \
             server authentication (serverAuth)"
        ),
        "{message}"
    );
    assert!(message.contains("--role destination"), "{message}");
    daemon.abort();
}

#[test]
fn a_key_file_others_can_read_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    migrate_common::certs::create_ca(&dir.path().join("ca")).unwrap();
    let tls = dir.path().join("dst");
    migrate_common::certs::issue(&dir.path().join("ca"), "127.0.0.1", &tls).unwrap();
    let key = tls.join("key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        TlsDir::load(&tls),
        Err(CertError::KeyExposed { mode: 0o644, .. })
    ));

    // The daemon refuses to start, and says how to fix it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_migrate-dst"))
        .args(["--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(&tls)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("chmod 600 {}", key.display())),
        "{stderr}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "started anyway: {stderr}"
    );
}

/// `runc spec` with a hook, a bind mount outside `--allow-bind`, an extra
/// capability, the host's pid namespace and an extra device.
fn privileged_config() -> String {
    let mut config = runc_spec();
    config["hooks"] = json!({"prestart": [{"path": "/usr/bin/true"}]});
    config["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/host", "type": "bind", "source": "/etc", "options": ["rbind"]}),
    );
    config["process"]["capabilities"]["bounding"]
        .as_array_mut()
        .unwrap()
        .push("CAP_SYS_ADMIN".into());
    config["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|ns| ns["type"] != "pid");
    config["linux"]["devices"] = json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]);
    config.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_beyond_the_policy_is_refused_with_every_reason() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        working_tools: true,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let reply = preflight(&mut control, hello("web1", &privileged_config())).await;
    assert!(!reply.accepted);
    let expected = [
        "hooks.prestart would run /usr/bin/true as root on this host",
        "capability CAP_SYS_ADMIN (in bounding)",
        "no pid namespace of its own",
        "device /dev/sda (b 8:0)",
        "bind mount source /etc is outside the host paths containers may use (this destination \
         allows none); migrate-dst allows it with --allow-bind DIR",
    ];
    assert_eq!(
        reply.refusals.len(),
        expected.len(),
        "{:#?}",
        reply.refusals
    );
    for (refusal, expected) in reply.refusals.iter().zip(expected) {
        assert!(
            refusal.starts_with(expected),
            "{refusal}\nexpected: {expected}"
        );
    }
    assert!(!dir.path().join("state/containers/web1").exists());
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_privileged_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        working_tools: true,
        policy: Policy::new(&[SOURCE.to_owned()], Vec::new(), true).unwrap(),
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let reply = preflight(&mut control, hello("web1", &privileged_config())).await;
    assert!(reply.accepted, "{:#?}", reply.refusals);
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}

/// Whether a bind source outside the allowance exists, or where a symlink
/// inside it leads, the source hears the same thing.
#[tokio::test(flavor = "multi_thread")]
async fn bind_refusals_do_not_tell_what_exists_outside_the_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("shared");
    std::fs::create_dir_all(allowed.join("data")).unwrap();
    std::os::unix::fs::symlink("/etc", allowed.join("to-etc")).unwrap();
    std::os::unix::fs::symlink("/nonexistent", allowed.join("to-nowhere")).unwrap();
    let setup = Setup {
        working_tools: true,
        policy: Policy::new(&[SOURCE.to_owned()], vec![allowed.clone()], false).unwrap(),
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;

    let refusals = |id: &'static str, sources: &[PathBuf]| {
        let mut config = runc_spec();
        for (n, source) in sources.iter().enumerate() {
            config["mounts"]
                .as_array_mut()
                .unwrap()
                .push(json!({"destination": format!("/m{n}"), "type": "bind", "source": source}));
        }
        let config = config.to_string();
        let dir = dir.path().to_owned();
        async move {
            let (endpoint, conn, mut control) = connect(&dir, port).await.unwrap();
            let reply = preflight(&mut control, hello(id, &config)).await;
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            reply
        }
    };
    // Inside and there: accepted.
    let reply = refusals("accepted", &[allowed.join("data")]).await;
    assert!(reply.accepted, "{:#?}", reply.refusals);

    let outside = [PathBuf::from("/etc"), PathBuf::from("/nonexistent/x")];
    let reply = refusals("outside", &outside).await;
    let with_path_elided = |refusals: &[String], paths: &[PathBuf]| -> Vec<String> {
        refusals
            .iter()
            .zip(paths)
            .map(|(r, p)| r.replace(&p.display().to_string(), "PATH"))
            .collect()
    };
    let elided = with_path_elided(&reply.refusals, &outside);
    assert_eq!(elided.len(), 2, "{:#?}", reply.refusals);
    assert_eq!(elided[0], elided[1]);

    let inside = [
        allowed.join("missing"),
        allowed.join("to-etc"),
        allowed.join("to-nowhere"),
    ];
    let reply = refusals("inside", &inside).await;
    let elided = with_path_elided(&reply.refusals, &inside);
    assert_eq!(elided.len(), 3, "{:#?}", reply.refusals);
    assert!(
        elided[0].contains("does not exist on this host or leads outside"),
        "{elided:?}"
    );
    assert!(elided.iter().all(|r| *r == elided[0]), "{elided:#?}");
    daemon.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_not_allowed_gets_no_more_than_a_few_kib_read() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        policy: allowing(&["other.example"]),
        working_tools: true,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    // A Hello of a megabyte: within the frame bound for an allowed source,
    // far beyond what a refused one may send.
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let big = json!({"ociVersion": "1.0.2", "padding": "x".repeat(1 << 20)}).to_string();
    control.send(hello("web1", &big)).await.unwrap();
    let answer = control.recv().await;
    assert!(
        answer.is_err(),
        "a refused source's megabyte was read and answered: {answer:?}"
    );
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    // The daemon goes on serving.
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let reply = preflight(&mut control, hello("web1", &runc_spec().to_string())).await;
    assert!(!reply.accepted);
    assert!(
        reply.refusals[0].contains(&format!("does not allow source {SOURCE}")),
        "{reply:?}"
    );
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
}
