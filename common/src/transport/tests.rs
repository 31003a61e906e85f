//! Both ends on loopback with certificates from throwaway CAs.

#![allow(clippy::unwrap_used)]
use super::*;
use crate::certs::{create_ca, issue, issue_with_role, Role};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
use rustls_pki_types::pem::PemObject;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PAYLOAD: &[u8] = b"checkpoint bytes";
// Every rejection is immediate, so anything near the idle timeout is a hang.
const TEST_DEADLINE: Duration = Duration::from_secs(10);

async fn within_deadline<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, future).await.unwrap()
}

fn new_ca(root: &Path, label: &str) -> PathBuf {
    let dir = root.join(label);
    create_ca(&dir).unwrap();
    dir
}

fn host(root: &Path, ca: &Path, name: &str) -> TlsDir {
    let dir = root.join(format!("host-{name}"));
    issue(ca, name, &dir).unwrap();
    TlsDir::load(&dir).unwrap()
}

fn host_as(root: &Path, ca: &Path, name: &str, role: Role) -> TlsDir {
    let dir = root.join(format!("host-{name}-{role:?}"));
    issue_with_role(ca, name, role, &dir).unwrap();
    TlsDir::load(&dir).unwrap()
}

/// A certificate from `ca` for `name`, in both roles, that expired a day ago.
fn expired_host(root: &Path, ca: &Path, name: &str) -> TlsDir {
    let dir = root.join(format!("host-{name}-expired"));
    issue(ca, name, &dir).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca.join("ca-key.pem")).unwrap()).unwrap();
    let ca_pem = std::fs::read(ca.join("ca.pem")).unwrap();
    let ca_der = CertificateDer::pem_slice_iter(&ca_pem)
        .next()
        .unwrap()
        .unwrap();
    let issuer = CertificateParams::from_ca_cert_der(&ca_der)
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.signed_by(&key, &issuer, &ca_key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
    TlsDir::load(&dir).unwrap()
}

/// The reason of a handshake this end refused.
fn local_refusal(err: &TransportError) -> String {
    match err {
        TransportError::Connect {
            source: ConnectionError::TransportError(cause),
            ..
        } => cause.to_string(),
        other => panic!("expected a handshake failure, got {other:?}"),
    }
}

/// A client whose certificate the server refuses finishes its side of the
/// handshake first (TLS 1.3): the refusal, with the server's reason, ends
/// its first exchange. Returns the client's error and the server's.
async fn refused_client(client: &TlsDir, server: &TlsDir) -> (String, String) {
    let (endpoint, port) = listen("127.0.0.1:0", server);
    let served = echo_once(endpoint);
    let outcome = within_deadline(async {
        let (_endpoint, conn) = connect(&format!("127.0.0.1:{port}"), client).await?;
        exchange(&conn).await
    })
    .await;
    let client_err = error_chain(outcome.unwrap_err());
    let server_err = within_deadline(served).await.unwrap().unwrap_err();
    (client_err, server_err.to_string())
}

/// An error and its sources on one line.
fn error_chain(err: BoxError) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

fn listen(addr: &str, tls: &TlsDir) -> (Endpoint, u16) {
    let endpoint = server_endpoint(addr.parse().unwrap(), tls).unwrap();
    let port = endpoint.local_addr().unwrap().port();
    (endpoint, port)
}

/// Accepts one connection, echoes one bi stream back and returns the
/// client's name once the client hangs up.
fn echo_once(endpoint: Endpoint) -> JoinHandle<Result<Option<String>, BoxError>> {
    tokio::spawn(async move {
        let conn = endpoint.accept().await.ok_or("endpoint closed")?.await?;
        let name = peer_name(&conn);
        let (mut send, mut recv) = conn.accept_bi().await?;
        let data = recv.read_to_end(1 << 20).await?;
        send.write_all(&data).await?;
        send.finish()?;
        conn.closed().await;
        Ok(name)
    })
}

async fn exchange(conn: &quinn::Connection) -> Result<Vec<u8>, BoxError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(PAYLOAD).await?;
    send.finish()?;
    Ok(recv.read_to_end(1 << 20).await?)
}

/// Dials `target`, echoes PAYLOAD through `server` and checks both sides
/// see the other's certificate name.
async fn round_trip(target: &str, client: &TlsDir, server: Endpoint, server_name: &str) {
    let served = echo_once(server);
    let (endpoint, conn) = within_deadline(connect(target, client)).await.unwrap();
    assert_eq!(within_deadline(exchange(&conn)).await.unwrap(), PAYLOAD);
    assert_eq!(peer_name(&conn).as_deref(), Some(server_name));
    let handshake = conn
        .handshake_data()
        .unwrap()
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .unwrap();
    assert_eq!(handshake.protocol.as_deref(), Some(ALPN));
    conn.close(0u32.into(), b"done");
    let client_name = within_deadline(served).await.unwrap().unwrap();
    assert_eq!(client_name.as_deref(), Some("source.example"));
    within_deadline(endpoint.wait_idle()).await;
}

#[tokio::test]
async fn echo_over_ipv4_literal() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    let (server, port) = listen("127.0.0.1:0", &host(tmp.path(), &ca, "127.0.0.1"));
    let client = host(tmp.path(), &ca, "source.example");
    round_trip(&format!("127.0.0.1:{port}"), &client, server, "127.0.0.1").await;
}

#[tokio::test]
async fn echo_over_dns_name() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    // Listen where "localhost" resolves first; connect() has to find it
    // among all of localhost's addresses.
    let local = tokio::net::lookup_host(("localhost", 0))
        .await
        .unwrap()
        .next()
        .unwrap();
    let (server, port) = listen(&local.to_string(), &host(tmp.path(), &ca, "localhost"));
    let client = host(tmp.path(), &ca, "source.example");
    round_trip(&format!("localhost:{port}"), &client, server, "localhost").await;
}

#[tokio::test]
async fn echo_over_ipv6_literal() {
    // Fails rather than passes without checking anything: IPv6 targets are
    // supported, so a host that cannot test them has to say so.
    if let Err(e) = std::net::UdpSocket::bind("[::1]:0") {
        panic!(
            "this host has no IPv6 loopback ({e}), so IPv6 targets cannot be tested here: \
             enable it (sysctl net.ipv6.conf.lo.disable_ipv6=0) and run the test again"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    let (server, port) = listen("[::1]:0", &host(tmp.path(), &ca, "::1"));
    let client = host(tmp.path(), &ca, "source.example");
    round_trip(&format!("[::1]:{port}"), &client, server, "::1").await;
}

#[tokio::test]
async fn client_signed_by_another_ca_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    let rogue_ca = new_ca(tmp.path(), "rogue-ca");
    let (server, port) = listen("127.0.0.1:0", &host(tmp.path(), &ca, "127.0.0.1"));
    let served = echo_once(server);
    // The rogue client trusts the real CA, so only the server's check can stop it.
    let mut client = host(tmp.path(), &rogue_ca, "source.example");
    client.ca_certs = host(tmp.path(), &ca, "other.example").ca_certs;

    let outcome = within_deadline(async {
        let (_endpoint, conn) = connect(&format!("127.0.0.1:{port}"), &client).await?;
        exchange(&conn).await
    })
    .await;
    // Both ends read the reason: which side refused, whose certificate,
    // which CA, what to do.
    let expected = "the destination refuses the source's certificate for source.example: it is \
                    not signed by the CA in the destination's";
    let client_err = error_chain(outcome.unwrap_err());
    assert!(client_err.contains(expected), "{client_err}");
    assert!(client_err.contains("--role source"), "{client_err}");
    let refusal = within_deadline(served).await.unwrap().unwrap_err();
    assert!(refusal.to_string().contains(expected), "{refusal}");
    assert!(
        refusal.to_string().contains("host-127.0.0.1/ca.pem"),
        "{refusal}"
    );
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    let server_tls = host(tmp.path(), &ca, "127.0.0.1");
    let (server, port) = listen("127.0.0.1:0", &server_tls);
    let served = echo_once(server);

    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(root_store(&server_tls).unwrap())
        .with_no_client_auth();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).unwrap()));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let endpoint = bind_client(addr, config).unwrap();

    let outcome = within_deadline(async {
        let conn = endpoint.connect(addr, "127.0.0.1")?.await?;
        exchange(&conn).await
    })
    .await;
    assert!(outcome.is_err(), "anonymous client got {outcome:?}");
    let refusal = within_deadline(served).await.unwrap().unwrap_err();
    assert!(refusal.to_string().contains("no certificates"), "{refusal}");
}

#[tokio::test]
async fn server_certificate_for_another_name_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    let (server, port) = listen("127.0.0.1:0", &host(tmp.path(), &ca, "198.18.0.9"));
    let served = echo_once(server);
    let client = host(tmp.path(), &ca, "source.example");

    let err = within_deadline(connect(&format!("127.0.0.1:{port}"), &client))
        .await
        .unwrap_err();
    let refusal = local_refusal(&err);
    assert!(
        refusal.contains(
            "the source refuses the destination's certificate for 198.18.0.9: it does not name \
             127.0.0.1, which the source dialed"
        ),
        "{refusal}"
    );
    assert!(
        refusal.contains("--name 127.0.0.1 --role destination"),
        "{refusal}"
    );
    let peer = within_deadline(served).await.unwrap().unwrap_err();
    assert!(
        peer.to_string().contains("does not name 127.0.0.1"),
        "{peer}"
    );
}

#[tokio::test]
async fn server_signed_by_another_ca_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    let rogue_ca = new_ca(tmp.path(), "rogue-ca");
    let mut rogue_server = host(tmp.path(), &rogue_ca, "127.0.0.1");
    // The rogue server trusts the real CA, so only the client's check can stop it.
    let client = host(tmp.path(), &ca, "source.example");
    rogue_server.ca_certs = client.ca_certs.clone();
    let (server, port) = listen("127.0.0.1:0", &rogue_server);
    let served = echo_once(server);

    let err = within_deadline(connect(&format!("127.0.0.1:{port}"), &client))
        .await
        .unwrap_err();
    let refusal = local_refusal(&err);
    assert!(
        refusal.contains(
            "the source refuses the destination's certificate for 127.0.0.1: it is not signed \
             by the CA in the source's"
        ),
        "{refusal}"
    );
    assert!(refusal.contains("host-source.example/ca.pem"), "{refusal}");
    assert!(within_deadline(served).await.unwrap().is_err());
}

#[tokio::test]
async fn expired_certificates_are_refused_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    let (client_err, server_err) = refused_client(
        &expired_host(tmp.path(), &ca, "source.example"),
        &host(tmp.path(), &ca, "127.0.0.1"),
    )
    .await;
    for err in [&client_err, &server_err] {
        assert!(
            err.contains(
                "the destination refuses the source's certificate for source.example: it \
                 expired (valid until Jan  1 00:00:00 2021 +00:00)"
            ),
            "{err}"
        );
        assert!(err.contains("migrate certs issue --role source"), "{err}");
    }

    let (server, port) = listen("127.0.0.1:0", &expired_host(tmp.path(), &ca, "127.0.0.1"));
    let served = echo_once(server);
    let client = host(tmp.path(), &ca, "source.example");
    let err = within_deadline(connect(&format!("127.0.0.1:{port}"), &client))
        .await
        .unwrap_err();
    let refusal = local_refusal(&err);
    assert!(
        refusal
            .contains("the source refuses the destination's certificate for 127.0.0.1: it expired"),
        "{refusal}"
    );
    assert!(refusal.contains("--role destination"), "{refusal}");
    assert!(within_deadline(served).await.unwrap().is_err());
}

#[tokio::test]
async fn certificates_are_refused_outside_their_role() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    // A destination-only certificate cannot dial.
    let (client_err, server_err) = refused_client(
        &host_as(tmp.path(), &ca, "source.example", Role::Destination),
        &host_as(tmp.path(), &ca, "127.0.0.1", Role::Destination),
    )
    .await;
    for err in [&client_err, &server_err] {
        assert!(
            err.contains(
                "the destination refuses the source's certificate for source.example: it is not \
                 for client authentication (clientAuth)"
            ),
            "{err}"
        );
    }

    // A source-only certificate cannot listen.
    let (server, port) = listen(
        "127.0.0.1:0",
        &host_as(tmp.path(), &ca, "127.0.0.1", Role::Source),
    );
    let served = echo_once(server);
    let client = host_as(tmp.path(), &ca, "source.example", Role::Source);
    let err = within_deadline(connect(&format!("127.0.0.1:{port}"), &client))
        .await
        .unwrap_err();
    let refusal = local_refusal(&err);
    assert!(
        refusal.contains(
            "the source refuses the destination's certificate for 127.0.0.1: it is not for \
             server authentication (serverAuth)"
        ),
        "{refusal}"
    );
    assert!(within_deadline(served).await.unwrap().is_err());

    // Each in its role, they talk.
    let (server, port) = listen(
        "127.0.0.1:0",
        &host_as(tmp.path(), &ca, "127.0.0.1", Role::Destination),
    );
    round_trip(&format!("127.0.0.1:{port}"), &client, server, "127.0.0.1").await;
}

#[test]
fn targets_need_a_port_and_brackets_around_ipv6() {
    assert_eq!(split_target("127.0.0.1:4433"), Some(("127.0.0.1", 4433)));
    assert_eq!(split_target("dst.example:1"), Some(("dst.example", 1)));
    assert_eq!(split_target("[::1]:4433"), Some(("::1", 4433)));
    for bad in [
        "dst.example",
        "dst.example:",
        "dst.example:0",
        "dst.example:http",
        ":4433",
        "::1:4433",
        "[::1]",
        "[::1]4433",
        "[]:4433",
    ] {
        assert_eq!(split_target(bad), None, "{bad:?}");
    }
}

#[tokio::test]
async fn bad_target_is_reported_before_any_network_activity() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(tmp.path(), "ca");
    let client = host(tmp.path(), &ca, "source.example");
    let err = connect("::1:4433", &client).await.unwrap_err();
    assert!(matches!(err, TransportError::BadTarget { .. }), "{err:?}");
}
