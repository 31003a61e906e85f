//! A host's TLS material as both agents load it, and the names a
//! certificate carries.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::{parse_certs, read_file, read_private, CertError, CA_CERT_FILE, CERT_FILE, KEY_FILE};

/// A host's TLS material loaded from its tls dir (ca.pem, cert.pem, key.pem).
#[derive(Debug)]
pub struct TlsDir {
    /// Where it was loaded from, for messages that point at its files.
    pub dir: PathBuf,
    pub ca_certs: Vec<CertificateDer<'static>>,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TlsDir {
    /// Reads `dir`/ca.pem, `dir`/cert.pem and `dir`/key.pem; refuses a
    /// key.pem that anyone but its owner can read or write.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let hint = || {
            format!(
                "run `migrate certs issue --ca CADIR --name <this host's name or IP> \
                 --role source|destination|both --out {}`",
                dir.display()
            )
        };
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let ca_certs = parse_certs(&ca_path, &read_file(&ca_path, hint)?)?;
        let cert_chain = parse_certs(&cert_path, &read_file(&cert_path, hint)?)?;
        let key =
            PrivateKeyDer::from_pem_slice(&read_private(&key_path, hint)?).map_err(|source| {
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
            dir: dir.to_owned(),
            ca_certs,
            cert_chain,
            key,
        })
    }

    /// The CA certificate file, for messages.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }
}

/// The subject of `cert` for display: its common name, or else its first DNS or
/// IP subjectAltName.
pub fn subject_name(cert: &CertificateDer<'_>) -> Option<String> {
    subject_names(cert).into_iter().next()
}

/// Every name `cert` carries: its common names, then its DNS and IP
/// subjectAltNames, each once; empty when it cannot be parsed.
pub fn subject_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for general_name in &san.value.general_names {
            let name = match *general_name {
                GeneralName::DNSName(dns) => Some(dns.to_owned()),
                // The parser hands over the raw octets: 4 for IPv4, 16 for IPv6.
                GeneralName::IPAddress(octets) => <[u8; 4]>::try_from(octets)
                    .map(IpAddr::from)
                    .or_else(|_| <[u8; 16]>::try_from(octets).map(IpAddr::from))
                    .ok()
                    .map(|ip| ip.to_string()),
                _ => None,
            };
            if let Some(name) = name.filter(|n| !names.contains(n)) {
                names.push(name);
            }
        }
    }
    names
}
