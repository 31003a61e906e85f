//! migrate's own PKI: a private CA and the host certificates it signs.
//!
//! Trust between hosts is exactly "signed by this CA"; the public web PKI plays
//! no part. Every host gets a single certificate that is valid for both TLS
//! server and client authentication, because every host both listens (as a
//! migration destination) and dials (as a migration source).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::server::ParsedCertificate;
use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const CA_LIFETIME: Duration = Duration::from_secs(3652 * DAY.as_secs());
// 825 days is the longest leaf lifetime that common TLS clients still accept.
const LEAF_LIFETIME: Duration = Duration::from_secs(825 * DAY.as_secs());
// Back-dating tolerates hosts whose clocks run somewhat behind the issuer's.
const CLOCK_SLACK: Duration = Duration::from_secs(60 * 60);

/// Why creating, issuing or loading certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path} does not exist; {hint}")]
    Missing { path: PathBuf, hint: String },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} already exists; refusing to overwrite a CA key (move it away first to really replace the CA)"
    )]
    AlreadyExists { path: PathBuf },
    #[error("{path} is not valid PEM")]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds a certificate that cannot be used to issue certificates")]
    CaCert {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{path} holds a private key that cannot sign certificates")]
    CaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{name:?} is neither a DNS name nor an IP address")]
    InvalidName { name: String },
    #[error("generating {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "a certificate issued with {ca_dir}/{CA_KEY_FILE} does not verify against {ca_dir}/{CA_CERT_FILE}; do the two files belong to the same `migrate certs ca` run?"
    )]
    CaMismatch {
        ca_dir: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the system clock is set before 1970")]
    Clock,
}

/// `migrate certs ca --out DIR`: creates a CA; writes DIR/ca.pem and
/// DIR/ca-key.pem (key file mode 0600, dir created if missing). Refuses to
/// overwrite an existing ca-key.pem (error AlreadyExists with the path).
pub fn create_ca(out_dir: &Path) -> Result<(), CertError> {
    let key_path = out_dir.join(CA_KEY_FILE);
    // Checked before generating anything so that a refused run leaves no trace;
    // the exclusive create below still closes the race with a concurrent run.
    if fs::symlink_metadata(&key_path).is_ok() {
        return Err(CertError::AlreadyExists { path: key_path });
    }
    create_dir(out_dir)?;

    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: "the CA key pair",
        source,
    })?;
    let mut params = ca_params(&key);
    set_validity(&mut params, CA_LIFETIME)?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertError::Generate {
            what: "the CA certificate",
            source,
        })?;

    write_private(&key_path, key.serialize_pem().as_bytes(), Overwrite::Refuse)?;
    write_public(&out_dir.join(CA_CERT_FILE), cert.pem().as_bytes())
}

/// `migrate certs issue --ca CADIR --name NAME --out DIR`: writes DIR/ca.pem
/// (copy of the CA cert), DIR/cert.pem, DIR/key.pem (0600), signed by the CA in
/// CADIR. NAME is a DNS name or an IP address (v4 or v6): it goes into the
/// subjectAltName as DNS or IP accordingly and is the CN. The certificate is
/// valid for both serverAuth and clientAuth (every host both dials and
/// listens). Validity: not_before = now - 1 hour, not_after = now + 825 days for
/// leaf certs, 10 years for the CA.
pub fn issue(ca_dir: &Path, name: &str, out_dir: &Path) -> Result<(), CertError> {
    // Accept the bracketed form too, since that is how IPv6 hosts are written in targets.
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    let invalid_name = || CertError::InvalidName {
        name: name.to_owned(),
    };
    // Validating with the same parser the TLS client uses guarantees that the
    // name can later be dialed and matched against this certificate.
    let server_name = ServerName::try_from(name).map_err(|_| invalid_name())?;
    let san = match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into().map_err(|_| invalid_name())?),
    };

    let ca_hint = || {
        format!(
            "run `migrate certs ca --out {}` to create a CA first",
            ca_dir.display()
        )
    };
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_file(&ca_cert_path, ca_hint)?;
    let ca_certs = parse_certs(&ca_cert_path, &ca_pem)?;
    let ca_key_pem = read_file(&ca_key_path, ca_hint)?;
    let ca_key_pem = String::from_utf8(ca_key_pem).map_err(|_| CertError::NoKey {
        path: ca_key_path.clone(),
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| CertError::CaKey {
        path: ca_key_path.clone(),
        source,
    })?;
    // Parsed from the DER that the CaMismatch check below verifies against, not
    // by re-reading ca.pem with rcgen's own PEM parser, so both see the same
    // certificate. rcgen wants the issuer as a `Certificate`; self-signing the
    // parsed parameters with the CA key gives one with ca.pem's name and key id.
    let ca_cert = ca_certs.first().ok_or_else(|| CertError::NoCertificate {
        path: ca_cert_path.clone(),
    })?;
    let issuer = CertificateParams::from_ca_cert_der(ca_cert)
        .and_then(|params| params.self_signed(&ca_key))
        .map_err(|source| CertError::CaCert {
            path: ca_cert_path.clone(),
            source,
        })?;

    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: "the host key pair",
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![san];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_LIFETIME)?;
    let cert = params
        .signed_by(&key, &issuer, &ca_key)
        .map_err(|source| CertError::Generate {
            what: "the host certificate",
            source,
        })?;

    // Catches a ca-key.pem that does not belong to ca.pem before the mismatch
    // surfaces as an opaque handshake failure on another host.
    check_issued(cert.der(), &ca_certs, &server_name).map_err(|source| CertError::CaMismatch {
        ca_dir: ca_dir.to_owned(),
        source,
    })?;

    create_dir(out_dir)?;
    write_private(
        &out_dir.join(KEY_FILE),
        key.serialize_pem().as_bytes(),
        Overwrite::Allow,
    )?;
    write_public(&out_dir.join(CERT_FILE), cert.pem().as_bytes())?;
    // Written from memory rather than copied: with --out equal to --ca, a file
    // copy onto itself would truncate the CA certificate.
    write_public(&out_dir.join(CA_CERT_FILE), &ca_pem)
}

/// A host's TLS material loaded from its tls dir (ca.pem, cert.pem, key.pem).
#[derive(Debug)]
pub struct TlsDir {
    pub ca_certs: Vec<CertificateDer<'static>>,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TlsDir {
    /// Reads `dir`/ca.pem, `dir`/cert.pem and `dir`/key.pem.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let hint = || {
            format!(
                "run `migrate certs issue --ca CADIR --name <this host's name or IP> --out {}`",
                dir.display()
            )
        };
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let ca_certs = parse_certs(&ca_path, &read_file(&ca_path, hint)?)?;
        let cert_chain = parse_certs(&cert_path, &read_file(&cert_path, hint)?)?;
        let key =
            PrivateKeyDer::from_pem_slice(&read_file(&key_path, hint)?).map_err(|source| {
                match source {
                    pem::Error::NoItemsFound => CertError::NoKey {
                        path: key_path.clone(),
                    },
                    source => CertError::Pem {
                        path: key_path.clone(),
                        source,
                    },
                }
            })?;
        Ok(Self {
            ca_certs,
            cert_chain,
            key,
        })
    }
}

/// The subject of `cert` for display: its common name, or else its first DNS or
/// IP subjectAltName.
pub(crate) fn subject_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
    {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value
        .general_names
        .iter()
        .find_map(|general_name| match *general_name {
            GeneralName::DNSName(dns) => Some(dns.to_owned()),
            // The parser hands over the raw octets: 4 for IPv4, 16 for IPv6.
            GeneralName::IPAddress(octets) => <[u8; 4]>::try_from(octets)
                .map(IpAddr::from)
                .or_else(|_| <[u8; 16]>::try_from(octets).map(IpAddr::from))
                .ok()
                .map(|ip| ip.to_string()),
            _ => None,
        })
}

/// The parameters of a new CA with `key`.
fn ca_params(key: &KeyPair) -> CertificateParams {
    // A per-CA name keeps certificates of different migrate CAs apart in logs
    // and in chain building.
    let public = key.public_key_raw();
    let tag: String = public[public.len().saturating_sub(6)..]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "migrate");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("migrate CA {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) -> Result<(), CertError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CertError::Clock)?;
    // rcgen's helper spares a direct dependency on the `time` crate.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(CLOCK_SLACK);
    params.not_after = epoch + now + lifetime;
    Ok(())
}

fn check_issued(
    cert: &CertificateDer<'_>,
    ca_certs: &[CertificateDer<'static>],
    name: &ServerName<'_>,
) -> Result<(), rustls::Error> {
    let mut roots = RootCertStore::empty();
    for ca in ca_certs {
        roots.add(ca.clone())?;
    }
    let parsed = ParsedCertificate::try_from(cert)?;
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &[],
        UnixTime::now(),
        algorithms.all,
    )?;
    verify_server_name(&parsed, name)
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_file(path: &Path, hint: impl FnOnce() -> String) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            CertError::Missing {
                path: path.to_owned(),
                hint: hint(),
            }
        } else {
            CertError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    // Only directories created here get 0700; they hold private keys.
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

#[derive(Clone, Copy)]
enum Overwrite {
    Refuse,
    Allow,
}

fn write_private(path: &Path, contents: &[u8], overwrite: Overwrite) -> Result<(), CertError> {
    let write_error = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).mode(0o600);
    match overwrite {
        Overwrite::Refuse => options.create_new(true),
        Overwrite::Allow => options.create(true).truncate(true),
    };
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            CertError::AlreadyExists {
                path: path.to_owned(),
            }
        } else {
            write_error(source)
        }
    })?;
    // `mode` only applies to new files; an existing key file may be more open,
    // so tighten it before the secret goes in.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

fn write_public(path: &Path, contents: &[u8]) -> Result<(), CertError> {
    fs::write(path, contents).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
            verify_server_name(&parsed, &ServerName::try_from("other.example").unwrap())
                .unwrap_err();
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
}
