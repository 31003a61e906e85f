// TEMPORARY STUB: replaced by the real module.
use std::path::{Path, PathBuf};
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerDigest(String);
#[derive(Debug, thiserror::Error)]
pub enum DigestError { #[error("x {path}")] Bad { path: PathBuf } }
impl LayerDigest { pub fn as_str(&self) -> &str { &self.0 } pub fn parse(_s: &str) -> Result<Self, DigestError> { unimplemented!() } }
impl std::fmt::Display for LayerDigest { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(&self.0) } }
pub fn layer_digest(_dir: &Path) -> Result<LayerDigest, DigestError> { unimplemented!() }
