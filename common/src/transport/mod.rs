//! QUIC endpoints for the link between the migration source and destination.
//!
//! Both ends authenticate with certificates from migrate's own CA
//! (see [`crate::certs`]): the destination accepts only clients whose
//! certificate that CA signed for client authentication (a source's role),
//! and the source accepts only a server whose certificate that CA signed for
//! server authentication (a destination's role) and for the very name or
//! address it dialed. There is deliberately no plaintext mode and no way to
//! skip verification. Refusals say which side refused whose certificate and
//! what to do ([`verify`]); which verified sources may push containers is
//! the destination's policy ([`crate::policy`]).

mod udp;
mod verify;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use tokio::task::JoinSet;

use crate::certs::{subject_name, subject_names, TlsDir};
use verify::{DestinationCertVerifier, SourceCertVerifier};

/// The ALPN protocol both sides insist on, so that a stray QUIC client (or a
/// future incompatible version of migrate) fails the handshake cleanly.
pub const ALPN: &[u8] = b"migrate/1";

const MIB: u32 = 1024 * 1024;
// Checkpoint images run to gigabytes and must cross in minutes, so the windows
// are sized for a high bandwidth-delay product rather than quinn's defaults.
const STREAM_RECEIVE_WINDOW: u32 = 16 * MIB;
const CONNECTION_RECEIVE_WINDOW: u32 = 64 * MIB;
const SEND_WINDOW: u64 = 64 * MIB as u64;
// Image files are sent on parallel uni streams; control exchanges use bi streams.
const MAX_UNI_STREAMS: u32 = 128;
const MAX_BIDI_STREAMS: u32 = 16;
// A frozen container is waiting on the link, so a dead peer has to be noticed
// within seconds; keep-alives keep a quiet but healthy link from idling out.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a silent link lasts before it counts as lost, unless the
/// source asks for less ([`connect_with_idle_timeout`]; QUIC uses the
/// smaller of the two sides' values).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why setting up the QUIC link failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{target} is not host:port (write IPv6 addresses in brackets, e.g. [::1]:4433)")]
    BadTarget { target: String },
    #[error("resolving {target}")]
    Resolve {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{target} resolved to no addresses")]
    NoAddress { target: String },
    #[error("binding a UDP socket to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("configuring TLS 1.3")]
    TlsVersion {
        #[source]
        source: rustls::Error,
    },
    #[error("the CA certificate cannot serve as a trust anchor")]
    TrustAnchor {
        #[source]
        source: rustls::Error,
    },
    #[error("building the certificate verifier")]
    Verifier {
        #[source]
        source: VerifierBuilderError,
    },
    #[error("the host certificate and key cannot be used as this host's TLS identity")]
    Identity {
        #[source]
        source: rustls::Error,
    },
    #[error("the TLS configuration has no cipher suite usable for QUIC")]
    Quic {
        #[source]
        source: NoInitialCipherSuite,
    },
    #[error("dialing {addr}")]
    Dial {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connecting to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: ConnectionError,
    },
}

/// Destination side: listens on `listen`; clients must present a certificate
/// signed by the CA in `tls` for client authentication (rustls
/// WebPkiClientVerifier); there is no plaintext mode and no way to skip
/// verification.
pub fn server_endpoint(listen: SocketAddr, tls: &TlsDir) -> Result<Endpoint, TransportError> {
    let provider = provider();
    let verifier = Arc::new(SourceCertVerifier {
        inner: WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(tls)?),
            provider.clone(),
        )
        .build()
        .map_err(|source| TransportError::Verifier { source })?,
        ca_file: tls.ca_file(),
    });
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TransportError::TlsVersion { source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(|source| TransportError::Identity { source })?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        QuicServerConfig::try_from(crypto).map_err(|source| TransportError::Quic { source })?;

    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(DEFAULT_IDLE_TIMEOUT));
    let socket = udp::bind(listen).map_err(|source| TransportError::Bind {
        addr: listen,
        source,
    })?;
    Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind {
        addr: listen,
        source,
    })
}

/// Source side: an endpoint bound to an ephemeral port on the unspecified
/// address of `peer`'s family, presenting `tls`'s certificate, trusting only
/// `tls`'s CA.
pub fn client_endpoint(peer: SocketAddr, tls: &TlsDir) -> Result<Endpoint, TransportError> {
    bind_client(peer, client_config(tls, DEFAULT_IDLE_TIMEOUT)?)
}

/// Resolves "host:port" (name or IP literal, IPv6 in brackets), dials it, and
/// verifies that the server's certificate matches `host` (DNS name or IP SAN).
/// Returns the connection and the endpoint (the caller must keep the endpoint
/// alive and call `endpoint.wait_idle()` at the end).
///
/// When the name resolves to several addresses they are all dialed at once and
/// the first handshake to complete wins: an address nobody listens on produces
/// no QUIC error at all, only a timeout after the idle period, so trying the
/// addresses one after another could stall for that long per address.
pub async fn connect(
    target: &str,
    tls: &TlsDir,
) -> Result<(Endpoint, quinn::Connection), TransportError> {
    connect_with_idle_timeout(target, tls, DEFAULT_IDLE_TIMEOUT).await
}

/// [`connect`], with a link that counts as lost after `idle_timeout` of
/// silence (keep-alives go out every 2 s, so a healthy link is never idle
/// that long when the timeout is longer than that).
pub async fn connect_with_idle_timeout(
    target: &str,
    tls: &TlsDir,
    idle_timeout: Duration,
) -> Result<(Endpoint, quinn::Connection), TransportError> {
    let (host, port) = split_target(target).ok_or_else(|| TransportError::BadTarget {
        target: target.to_owned(),
    })?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| TransportError::Resolve {
            target: target.to_owned(),
            source,
        })?
        .collect();
    let config = client_config(tls, idle_timeout)?;

    let mut failure = None;
    let mut attempts = JoinSet::new();
    for addr in addrs {
        let attempt = bind_client(addr, config.clone()).and_then(|endpoint| {
            endpoint
                .connect(addr, host)
                .map(|connecting| (endpoint, connecting))
                .map_err(|source| TransportError::Dial { addr, source })
        });
        match attempt {
            Ok((endpoint, connecting)) => {
                attempts.spawn(async move { (addr, endpoint, connecting.await) });
            }
            // The other address family may still work (e.g. a host without IPv6).
            Err(err) => keep_most_telling(&mut failure, err),
        }
    }

    while let Some(joined) = attempts.join_next().await {
        let (addr, endpoint, result) = match joined {
            Ok(outcome) => outcome,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // Only cancelled when the runtime shuts down under us.
            Err(_) => continue,
        };
        match result {
            Ok(conn) => {
                tracing::debug!(%addr, peer = target, "connected");
                // Dropping the set aborts the slower attempts.
                return Ok((endpoint, conn));
            }
            Err(source) => {
                tracing::debug!(%addr, peer = target, error = %source, "connection attempt failed");
                keep_most_telling(&mut failure, TransportError::Connect { addr, source });
            }
        }
    }
    Err(failure.unwrap_or_else(|| TransportError::NoAddress {
        target: target.to_owned(),
    }))
}

/// The peer's certificate subject name (CN or first SAN) of an accepted
/// connection, for logs.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    subject_name(&peer_certificate(conn)?)
}

/// Every name (CNs, DNS and IP subjectAltNames) the peer's certificate
/// carries, all vouched for by the CA: what `migrate-dst --allow` matches.
pub fn peer_names(conn: &quinn::Connection) -> Vec<String> {
    peer_certificate(conn)
        .map(|cert| subject_names(&cert))
        .unwrap_or_default()
}

fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    chain.first().cloned()
}

/// Keeps the first failure worth reporting: an address that could not be
/// bound or reached says little about why the peer is unavailable, so a
/// handshake failure from another address replaces it.
fn keep_most_telling(failure: &mut Option<TransportError>, err: TransportError) {
    let says_little = |err: &TransportError| {
        matches!(
            err,
            TransportError::Bind { .. }
                | TransportError::Connect {
                    source: ConnectionError::TimedOut,
                    ..
                }
        )
    };
    let replace = match failure {
        None => true,
        Some(current) => says_little(current) && !says_little(&err),
    };
    if replace {
        *failure = Some(err);
    }
}

/// Splits "host:port" where host is a name, an IPv4 literal or a bracketed IPv6
/// literal; the brackets are removed from the returned host.
fn split_target(target: &str) -> Option<(&str, u16)> {
    let (host, port) = match target.strip_prefix('[') {
        Some(rest) => {
            let (host, rest) = rest.split_once(']')?;
            (host, rest.strip_prefix(':')?)
        }
        None => {
            let (host, port) = target.rsplit_once(':')?;
            // An unbracketed IPv6 literal cannot be told apart from its port.
            if host.contains(':') {
                return None;
            }
            (host, port)
        }
    };
    let port = port.parse().ok().filter(|&port| port != 0)?;
    (!host.is_empty()).then_some((host, port))
}

/// The one transport configuration both ends use.
fn transport_config(idle_timeout: Duration) -> Arc<TransportConfig> {
    let mut config = TransportConfig::default();
    config
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_BIDI_STREAMS))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            u32::try_from(idle_timeout.as_millis()).unwrap_or(u32::MAX),
        ))));
    Arc::new(config)
}

/// The ring provider, named explicitly so that behaviour does not depend on
/// whichever process-wide default some other crate may have installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(tls: &TlsDir) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    for ca in &tls.ca_certs {
        roots
            .add(ca.clone())
            .map_err(|source| TransportError::TrustAnchor { source })?;
    }
    Ok(roots)
}

fn client_config(
    tls: &TlsDir,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = provider();
    let verifier = DestinationCertVerifier {
        inner: WebPkiServerVerifier::builder_with_provider(
            Arc::new(root_store(tls)?),
            provider.clone(),
        )
        .build()
        .map_err(|source| TransportError::Verifier { source })?,
        ca_file: tls.ca_file(),
    };
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TransportError::TlsVersion { source })?
        // "dangerous" only in name: the verifier is webpki's, with clearer
        // refusals (see `verify`).
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(|source| TransportError::Identity { source })?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        QuicClientConfig::try_from(crypto).map_err(|source| TransportError::Quic { source })?;

    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(idle_timeout));
    Ok(config)
}

fn bind_client(peer: SocketAddr, config: quinn::ClientConfig) -> Result<Endpoint, TransportError> {
    let addr = match peer {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = udp::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
    let mut endpoint = Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

#[cfg(test)]
mod tests;
