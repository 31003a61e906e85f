//! Issuing and loading certificates, in temporary directories.

#![allow(clippy::unwrap_used)]
use super::*;
use rustls::server::WebPkiClientVerifier;
use std::sync::Arc;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn roots(tls: &TlsDir) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for ca in &tls.ca_certs {
        roots.add(ca.clone()).unwrap();
    }
    roots
}

fn verify_at(tls: &TlsDir, now: UnixTime) -> Result<(), rustls::Error> {
    let parsed = ParsedCertificate::try_from(&tls.cert_chain[0])?;
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    verify_server_cert_signed_by_trust_anchor(&parsed, &roots(tls), &[], now, algorithms.all)
}

fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

fn ago(offset: Duration) -> UnixTime {
    UnixTime::since_unix_epoch(since_epoch() - offset)
}

fn from_now(offset: Duration) -> UnixTime {
    UnixTime::since_unix_epoch(since_epoch() + offset)
}

#[test]
fn create_ca_refuses_to_overwrite_and_keys_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("new/ca");
    create_ca(&ca_dir).unwrap();
    let key_path = ca_dir.join(CA_KEY_FILE);
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&ca_dir), 0o700);
    let ca_before = fs::read(ca_dir.join(CA_CERT_FILE)).unwrap();
    let key_before = fs::read(&key_path).unwrap();

    match create_ca(&ca_dir) {
        Err(CertError::AlreadyExists { path }) => assert_eq!(path, key_path),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(fs::read(ca_dir.join(CA_CERT_FILE)).unwrap(), ca_before);
    assert_eq!(fs::read(&key_path).unwrap(), key_before);

    let host_dir = tmp.path().join("host");
    issue(&ca_dir, "node1.example", &host_dir).unwrap();
    assert_eq!(mode(&host_dir.join(KEY_FILE)), 0o600);

    // Re-issuing over a key file that was loosened tightens it again.
    fs::set_permissions(host_dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
    issue(&ca_dir, "node1.example", &host_dir).unwrap();
    assert_eq!(mode(&host_dir.join(KEY_FILE)), 0o600);
}

#[test]
fn issued_certificates_carry_the_name_and_both_usages() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    create_ca(&ca_dir).unwrap();
    for (name, expected_subject) in [
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "localhost"),
        ("::1", "::1"),
        ("[fd00::7]", "fd00::7"),
    ] {
        let dir = tmp.path().join(expected_subject.replace(':', "_"));
        issue(&ca_dir, name, &dir).unwrap();
        let tls = TlsDir::load(&dir).unwrap();
        assert_eq!(
            tls.ca_certs,
            parse_certs(
                Path::new("ca"),
                &fs::read(ca_dir.join(CA_CERT_FILE)).unwrap()
            )
            .unwrap()
        );
        let cert = &tls.cert_chain[0];
        assert_eq!(subject_name(cert).as_deref(), Some(expected_subject));

        let parsed = ParsedCertificate::try_from(cert).unwrap();
        verify_server_name(&parsed, &ServerName::try_from(expected_subject).unwrap()).unwrap();
        verify_server_name(&parsed, &ServerName::try_from("other.example").unwrap()).unwrap_err();
        // serverAuth: the web PKI server path checks the EKU.
        verify_at(&tls, UnixTime::now()).unwrap();
        // clientAuth: the client-certificate verifier checks the EKU.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&tls)), provider)
            .build()
            .unwrap()
            .verify_client_cert(cert, &[], UnixTime::now())
            .unwrap();
    }
}

#[test]
fn leaf_validity_is_backdated_an_hour_and_lasts_825_days() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    create_ca(&ca_dir).unwrap();
    issue(&ca_dir, "node1.example", &tmp.path().join("host")).unwrap();
    let tls = TlsDir::load(&tmp.path().join("host")).unwrap();
    let minute = Duration::from_secs(60);
    let days_825 = Duration::from_secs(825 * 24 * 60 * 60);

    verify_at(&tls, ago(59 * minute)).unwrap();
    verify_at(&tls, ago(61 * minute)).unwrap_err();
    verify_at(&tls, from_now(days_825 - minute)).unwrap();
    verify_at(&tls, from_now(days_825 + minute)).unwrap_err();
}

#[test]
fn subject_name_is_the_cn_or_else_the_first_alt_name() {
    let key = KeyPair::generate().unwrap();
    for (cn, sans, expected) in [
        (Some("cn.example"), vec!["san.example"], "cn.example"),
        (None, vec!["fd00::7", "b.example"], "fd00::7"),
        (None, vec!["10.0.0.1", "b.example"], "10.0.0.1"),
        (None, vec!["a.example", "10.0.0.1"], "a.example"),
    ] {
        let mut params =
            CertificateParams::new(sans.into_iter().map(str::to_owned).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_name(cert.der()).as_deref(), Some(expected));
    }
    let truncated = CertificateDer::from(vec![0x30, 0x82, 0x01, 0x00, 0x30]);
    assert_eq!(subject_name(&truncated), None);
}

#[test]
fn load_names_the_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    create_ca(&ca_dir).unwrap();
    let host_dir = tmp.path().join("host");
    issue(&ca_dir, "node1.example", &host_dir).unwrap();
    let key_path = host_dir.join(KEY_FILE);
    fs::remove_file(&key_path).unwrap();

    let err = TlsDir::load(&host_dir).unwrap_err();
    assert!(matches!(&err, CertError::Missing { path, .. } if *path == key_path));
    let message = err.to_string();
    assert!(
        message.contains(&key_path.display().to_string()),
        "{message}"
    );
    assert!(message.contains("migrate certs issue"), "{message}");

    fs::write(&key_path, "not pem\n").unwrap();
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        TlsDir::load(&host_dir),
        Err(CertError::NoKey { path }) if path == key_path
    ));
}

#[test]
fn issue_rejects_bad_names_and_missing_or_mismatched_cas() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    let err = issue(&tmp.path().join("nowhere"), "node1.example", &out).unwrap_err();
    assert!(err.to_string().contains("migrate certs ca"), "{err}");

    let ca_a = tmp.path().join("a");
    let ca_b = tmp.path().join("b");
    create_ca(&ca_a).unwrap();
    create_ca(&ca_b).unwrap();
    for bad in ["", "has space", "under_score!", "a..b"] {
        assert!(
            matches!(issue(&ca_a, bad, &out), Err(CertError::InvalidName { .. })),
            "{bad:?} accepted"
        );
    }

    fs::copy(ca_b.join(CA_KEY_FILE), ca_a.join(CA_KEY_FILE)).unwrap();
    assert!(matches!(
        issue(&ca_a, "node1.example", &out),
        Err(CertError::CaMismatch { .. })
    ));
    assert!(!out.exists(), "a failed issue must not write anything");
}

#[test]
fn issuing_into_the_ca_dir_keeps_the_ca_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    create_ca(tmp.path()).unwrap();
    let ca_before = fs::read(tmp.path().join(CA_CERT_FILE)).unwrap();
    issue(tmp.path(), "node1.example", tmp.path()).unwrap();
    assert_eq!(fs::read(tmp.path().join(CA_CERT_FILE)).unwrap(), ca_before);
    TlsDir::load(tmp.path()).unwrap();
}

fn verify_client(tls: &TlsDir) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(tls)), provider)
        .build()
        .unwrap()
        .verify_client_cert(&tls.cert_chain[0], &[], UnixTime::now())
        .map(drop)
}

#[test]
fn roles_set_the_extended_key_usage_rustls_enforces() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    create_ca(&ca_dir).unwrap();
    let wrong_purpose = |r: Result<(), rustls::Error>| match r {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::InvalidPurposeContext { .. },
        )) => {}
        other => panic!("expected a refusal for its purpose, got {other:?}"),
    };
    for (role, dials, listens) in [
        (Role::Source, true, false),
        (Role::Destination, false, true),
        (Role::Both, true, true),
    ] {
        let dir = tmp.path().join(format!("{role:?}"));
        issue_with_role(&ca_dir, "node1.example", role, &dir).unwrap();
        let tls = TlsDir::load(&dir).unwrap();
        match dials {
            true => verify_client(&tls).unwrap(),
            false => wrong_purpose(verify_client(&tls)),
        }
        match listens {
            true => verify_at(&tls, UnixTime::now()).unwrap(),
            false => wrong_purpose(verify_at(&tls, UnixTime::now())),
        }
    }
}

#[test]
fn private_keys_open_to_group_or_others_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    create_ca(&ca_dir).unwrap();
    let host_dir = tmp.path().join("host");
    issue(&ca_dir, "node1.example", &host_dir).unwrap();
    let key_path = host_dir.join(KEY_FILE);
    for exposed in [0o644, 0o640, 0o604, 0o660] {
        fs::set_permissions(&key_path, fs::Permissions::from_mode(exposed)).unwrap();
        let err = TlsDir::load(&host_dir).unwrap_err();
        assert!(
            matches!(&err, CertError::KeyExposed { path, mode } if *path == key_path && *mode == exposed),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("chmod 600 {}", key_path.display())),
            "{message}"
        );
        assert!(
            message.contains(&format!("mode {exposed:04o}")),
            "{message}"
        );
    }
    // The owner's own bits do not matter.
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o400)).unwrap();
    TlsDir::load(&host_dir).unwrap();

    // Nor is a CA key that others can read used to sign anything.
    let ca_key = ca_dir.join(CA_KEY_FILE);
    fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        issue(&ca_dir, "node2.example", &tmp.path().join("other")),
        Err(CertError::KeyExposed { path, .. }) if path == ca_key
    ));
}

#[test]
fn subject_names_lists_every_name_once() {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["a.example".to_owned(), "10.0.0.1".to_owned()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "a.example");
    let cert = params.self_signed(&key).unwrap();
    assert_eq!(subject_names(cert.der()), ["a.example", "10.0.0.1"]);
    assert!(subject_names(&CertificateDer::from(vec![0x30])).is_empty());
}
