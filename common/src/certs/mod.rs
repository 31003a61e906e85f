//! migrate's own PKI: a private CA and the host certificates it signs.
//!
//! Trust between hosts starts with "signed by this CA"; the public web PKI
//! plays no part. A certificate's [`Role`] says what its host may be: a
//! source dials (TLS client authentication), a destination listens (server
//! authentication), and a host that is both gets both. Which sources may
//! push containers to a destination is that destination's own policy
//! (`migrate-dst --allow`, see [`crate::policy`]).

mod tls_dir;

pub use tls_dir::{subject_name, subject_names, TlsDir};

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

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
    #[error(
        "{path} holds a private key but group or others may access it (mode {mode:04o}); \
         make it the owner's alone: chmod 600 {path}"
    )]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("building a verifier for {ca_dir}/{CA_CERT_FILE}")]
    Verifier {
        ca_dir: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the system clock is set before 1970")]
    Clock,
}

/// What a host's certificate lets it be in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Dials destinations: clientAuth only.
    Source,
    /// Listens for sources: serverAuth only.
    Destination,
    /// Both, as every certificate was before roles existed.
    #[default]
    Both,
}

impl Role {
    fn dials(self) -> bool {
        matches!(self, Self::Source | Self::Both)
    }

    fn listens(self) -> bool {
        matches!(self, Self::Destination | Self::Both)
    }

    fn key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        let mut usages = Vec::new();
        if self.listens() {
            usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if self.dials() {
            usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        usages
    }
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

/// [`issue_with_role`] for a host that is both source and destination.
pub fn issue(ca_dir: &Path, name: &str, out_dir: &Path) -> Result<(), CertError> {
    issue_with_role(ca_dir, name, Role::Both, out_dir)
}

/// `migrate certs issue --ca CADIR --name NAME --role ROLE --out DIR`: writes
/// DIR/ca.pem (copy of the CA cert), DIR/cert.pem, DIR/key.pem (0600), signed
/// by the CA in CADIR. NAME is a DNS name or an IP address (v4 or v6): it goes
/// into the subjectAltName as DNS or IP accordingly and is the CN. ROLE sets
/// the extended key usage: clientAuth for a source, serverAuth for a
/// destination, both for both; rustls on the peer refuses a certificate used
/// in a role it does not carry. Validity: not_before = now - 1 hour,
/// not_after = now + 825 days for leaf certs, 10 years for the CA.
pub fn issue_with_role(
    ca_dir: &Path,
    name: &str,
    role: Role,
    out_dir: &Path,
) -> Result<(), CertError> {
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
    let ca_key_pem = read_private(&ca_key_path, ca_hint)?;
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
    params.extended_key_usages = role.key_usages();
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
    check_issued(cert.der(), &ca_certs, &server_name, role, ca_dir)?;

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

/// Verifies `cert` as its peers will, in each of its roles.
fn check_issued(
    cert: &CertificateDer<'_>,
    ca_certs: &[CertificateDer<'static>],
    name: &ServerName<'_>,
    role: Role,
    ca_dir: &Path,
) -> Result<(), CertError> {
    let mismatch = |source| CertError::CaMismatch {
        ca_dir: ca_dir.to_owned(),
        source,
    };
    let mut roots = RootCertStore::empty();
    for ca in ca_certs {
        roots.add(ca.clone()).map_err(mismatch)?;
    }
    let parsed = ParsedCertificate::try_from(cert).map_err(mismatch)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    if role.listens() {
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(mismatch)?;
    }
    if role.dials() {
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|source| CertError::Verifier {
                ca_dir: ca_dir.to_owned(),
                source,
            })?
            .verify_client_cert(cert, &[], UnixTime::now())
            .map_err(mismatch)?;
    }
    verify_server_name(&parsed, name).map_err(mismatch)
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

/// Reads a private key file, refusing one that group or others may read or
/// write: checked on the open file, so the file checked is the file read.
fn read_private(path: &Path, hint: impl FnOnce() -> String) -> Result<Vec<u8>, CertError> {
    let read_error = |source| CertError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            CertError::Missing {
                path: path.to_owned(),
                hint: hint(),
            }
        } else {
            read_error(source)
        }
    })?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CertError::KeyExposed {
            path: path.to_owned(),
            mode,
        });
    }
    let mut contents = Vec::new();
    file.read_to_end(&mut contents).map_err(read_error)?;
    Ok(contents)
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
mod tests;
