// TEMPORARY STUB: replaced by the real module.
use std::path::{Path, PathBuf};
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError { #[error("x {path}")] UnsafePath { path: PathBuf } }
pub fn pack_dir<W: std::io::Write>(_dir: &Path, _out: W) -> Result<W, ArchiveError> { unimplemented!() }
pub fn unpack_dir<R: std::io::Read>(_input: R, _dest: &Path) -> Result<(), ArchiveError> { unimplemented!() }
