//! The certificate checks of both ends. Every decision is webpki's (the
//! verifiers rustls builds: chain to the CA, validity, name, extended key
//! usage); these wrappers only replace its refusals with ones that say which
//! side refused whose certificate, for which names, and what to do, because
//! the refused side reads them too: QUIC carries the reason to the peer.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::certs::subject_names;

/// Whose certificate is being checked.
#[derive(Debug, Clone, Copy)]
enum Holder {
    /// By a destination, as a TLS client's.
    Source,
    /// By a source, as the TLS server's.
    Destination,
}

impl Holder {
    fn name(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }

    fn checker(self) -> &'static str {
        match self {
            Self::Source => "destination",
            Self::Destination => "source",
        }
    }

    fn usage(self) -> &'static str {
        match self {
            Self::Source => "client authentication (clientAuth)",
            Self::Destination => "server authentication (serverAuth)",
        }
    }
}

/// A refusal worded for both ends.
#[derive(Debug)]
struct Refusal(String);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// Rewords webpki's refusal `err` of `cert`, held by `holder`, checked
/// against the CA in `ca_file`.
fn explain(err: Error, holder: Holder, cert: &CertificateDer<'_>, ca_file: &Path) -> Error {
    let Error::InvalidCertificate(cause) = &err else {
        return err;
    };
    let role = holder.name();
    let why = match cause {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
            "it is not signed by the CA in the {}'s {}; both hosts need certificates from the \
             same `migrate certs ca`: issue this one with `migrate certs issue --ca <that CA> \
             --role {role}`",
            holder.checker(),
            ca_file.display()
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
            "it expired ({}); issue a new one with `migrate certs issue --role {role}`",
            validity(cert, Bound::NotAfter)
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
            "it is not valid yet ({}): check both hosts' clocks",
            validity(cert, Bound::NotBefore)
        ),
        CertificateError::NotValidForNameContext { expected, .. } => {
            let dialed = expected.to_str();
            format!(
                "it does not name {dialed}, which the source dialed; dial the destination by a \
                 name its certificate carries, or issue it one for this name with `migrate \
                 certs issue --name {dialed} --role destination`"
            )
        }
        CertificateError::NotValidForName => {
            "it does not name the host the source dialed; dial the destination by a name its \
             certificate carries"
                .to_owned()
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!(
                "it is not for {} (was it issued with another --role?); issue it with \
                 `migrate certs issue --role {role}` or `--role both`",
                holder.usage()
            )
        }
        other => format!("{other}"),
    };
    let names = subject_names(cert);
    let names = if names.is_empty() {
        "no name".to_owned()
    } else {
        names.join(", ")
    };
    Error::Other(OtherError(Arc::new(Refusal(format!(
        "the {} refuses the {role}'s certificate for {names}: {why}",
        holder.checker()
    )))))
}

#[derive(Clone, Copy)]
enum Bound {
    NotBefore,
    NotAfter,
}

/// The certificate's validity bound, as the message shows it.
fn validity(cert: &CertificateDer<'_>, bound: Bound) -> String {
    match X509Certificate::from_der(cert) {
        Ok((_, cert)) => match bound {
            Bound::NotBefore => format!("valid from {}", cert.validity().not_before),
            Bound::NotAfter => format!("valid until {}", cert.validity().not_after),
        },
        Err(_) => "its validity cannot be read".into(),
    }
}

/// The destination's check of a source's certificate.
#[derive(Debug)]
pub(super) struct SourceCertVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub ca_file: PathBuf,
}

impl ClientCertVerifier for SourceCertVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| explain(e, Holder::Source, end_entity, &self.ca_file))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The source's check of the destination's certificate.
#[derive(Debug)]
pub(super) struct DestinationCertVerifier {
    pub inner: Arc<WebPkiServerVerifier>,
    pub ca_file: PathBuf,
}

impl ServerCertVerifier for DestinationCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| explain(e, Holder::Destination, end_entity, &self.ca_file))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
