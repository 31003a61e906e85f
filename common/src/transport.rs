// TEMPORARY STUB: replaced by the real module.
use std::net::SocketAddr;
use crate::certs::TlsDir;
#[derive(Debug, thiserror::Error)]
pub enum TransportError { #[error("x {target}")] BadTarget { target: String } }
pub const ALPN: &[u8] = b"migrate/1";
pub fn server_endpoint(_listen: SocketAddr, _tls: &TlsDir) -> Result<quinn::Endpoint, TransportError> { unimplemented!() }
pub fn client_endpoint(_peer: SocketAddr, _tls: &TlsDir) -> Result<quinn::Endpoint, TransportError> { unimplemented!() }
pub async fn connect(_target: &str, _tls: &TlsDir) -> Result<(quinn::Endpoint, quinn::Connection), TransportError> { unimplemented!() }
pub fn peer_name(_conn: &quinn::Connection) -> Option<String> { unimplemented!() }
