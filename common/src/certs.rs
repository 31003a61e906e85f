// TEMPORARY STUB: replaced by the real module.
use std::path::{Path, PathBuf};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
#[derive(Debug, thiserror::Error)]
pub enum CertError { #[error("x {path}")] Read { path: PathBuf } }
pub fn create_ca(_out_dir: &Path) -> Result<(), CertError> { unimplemented!() }
pub fn issue(_ca_dir: &Path, _name: &str, _out_dir: &Path) -> Result<(), CertError> { unimplemented!() }
#[derive(Debug)] pub struct TlsDir { pub ca_certs: Vec<CertificateDer<'static>>, pub cert_chain: Vec<CertificateDer<'static>>, pub key: PrivateKeyDer<'static> }
impl TlsDir { pub fn load(_dir: &Path) -> Result<Self, CertError> { unimplemented!() } }
