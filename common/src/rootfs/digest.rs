//! Content digest of a lower layer directory.
//!
//! Both hosts digest their copy of a layer and compare the results to decide whether the
//! layer has to be sent. The digest is BLAKE3 over a canonical encoding of the tree, written
//! `b3:<64 lowercase hex digits>`:
//!
//! * The walk is depth-first with the entries of each directory in byte order of their
//!   names, so the encoding does not depend on `readdir` order.
//! * Each entry contributes its path relative to the layer root, its type, permission bits
//!   (setuid/setgid/sticky included), numeric owner, device number (device nodes only), size
//!   and content (regular files only), link target (symlinks only) and all of its extended
//!   attributes sorted by name. Variable-length fields are prefixed with their length as a
//!   little-endian u64 and the content with the size already encoded, so no two different
//!   trees give the same byte sequence.
//! * Left out on purpose: timestamps and inode numbers (they differ between copies of the
//!   same layer), directory sizes (they depend on the filesystem and its history), link counts,
//!   and the layer root's own metadata, which is an artifact of how the snapshotter created
//!   the directory and is never visible in a container's merged view (overlayfs takes the
//!   root's attributes from the upper layer).
//! * Sockets are left out too, as the archive that sends a layer leaves them out (see
//!   [`crate::rootfs::archive::pack_dir`]): a socket inode is only a name a live process
//!   listened under, so a layer and its copy without the socket are the same layer, and the
//!   destination's copy verifies. A tree without sockets has the digest it always had.

use std::fmt;
use std::fs::{self, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const PREFIX: &str = "b3:";
/// Domain separation, so a change of the encoding cannot collide with digests made by an
/// older one.
const ENCODING_TAG: &[u8] = b"migrate layer digest v1\0";
const READ_BUFFER: usize = 1 << 20;
/// Cap on how much of an invalid wire value is kept in an error.
const MAX_REPORTED_INPUT: usize = 80;

/// Why a layer could not be digested, or a digest string was not valid.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// Listing, statting or reading something in the layer.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file's size or identity changed while it was being hashed.
    #[error("{path} changed while it was being hashed")]
    Changed { path: PathBuf },
    /// A digest string that is not `b3:` and 64 lowercase hex digits; `input` is cut short
    /// if it is long.
    #[error("invalid layer digest {input:?}: expected \"b3:\" and 64 lowercase hex digits")]
    Parse { input: String },
}

/// A layer's content digest, hex blake3, e.g. "b3:4f2a...". Two directories with the same tree
/// (names, types, modes, owners, contents, link targets, rdev, xattrs) have the same digest
/// regardless of mtimes and inode numbers; any difference in those changes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerDigest(String);

impl LayerDigest {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Validates `s` strictly, since digests arrive from the peer and may end up in paths: only
    /// `b3:` followed by exactly 64 lowercase hex digits is accepted.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let valid = s.strip_prefix(PREFIX).is_some_and(|hex| {
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(DigestError::Parse {
                input: s.chars().take(MAX_REPORTED_INPUT).collect(),
            })
        }
    }
}

impl fmt::Display for LayerDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Digests the tree under `dir` (see the module documentation for what counts). Run as root:
/// without `CAP_SYS_ADMIN` the kernel hides `trusted.*` xattrs.
pub fn layer_digest(dir: &Path) -> Result<LayerDigest, DigestError> {
    let root = fs::symlink_metadata(dir).map_err(|source| read_error(dir, source))?;
    if !root.is_dir() {
        return Err(read_error(dir, io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(ENCODING_TAG);
    let mut buf = vec![0u8; READ_BUFFER];
    let mut stack: Vec<(PathBuf, PathBuf)> = children(dir, Path::new(""))?;
    while let Some((abs, rel)) = stack.pop() {
        let meta = fs::symlink_metadata(&abs).map_err(|source| read_error(&abs, source))?;
        if meta.file_type().is_socket() {
            continue;
        }
        hash_entry(&mut hasher, &abs, &rel, &meta, &mut buf)?;
        if meta.is_dir() {
            stack.extend(children(&abs, &rel)?);
        }
    }
    Ok(LayerDigest(format!(
        "{PREFIX}{}",
        hasher.finalize().to_hex()
    )))
}

fn read_error(path: &Path, source: io::Error) -> DigestError {
    DigestError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// `(absolute, relative)` paths of the entries of `abs`, in reverse byte order of their names
/// so that popping them off a stack visits them in order.
fn children(abs: &Path, rel: &Path) -> Result<Vec<(PathBuf, PathBuf)>, DigestError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(abs).map_err(|source| read_error(abs, source))? {
        names.push(entry.map_err(|source| read_error(abs, source))?.file_name());
    }
    names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    Ok(names
        .into_iter()
        .map(|name| (abs.join(&name), rel.join(&name)))
        .collect())
}

fn put_u64(hasher: &mut blake3::Hasher, value: u64) {
    hasher.update(&value.to_le_bytes());
}

fn put_bytes(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    put_u64(hasher, bytes.len() as u64);
    hasher.update(bytes);
}

fn hash_entry(
    hasher: &mut blake3::Hasher,
    abs: &Path,
    rel: &Path,
    meta: &Metadata,
    buf: &mut [u8],
) -> Result<(), DigestError> {
    let file_type = meta.file_type();
    let type_tag: u8 = if file_type.is_file() {
        b'f'
    } else if file_type.is_dir() {
        b'd'
    } else if file_type.is_symlink() {
        b'l'
    } else if file_type.is_char_device() {
        b'c'
    } else if file_type.is_block_device() {
        b'b'
    } else {
        // Sockets never get here: what is left is a FIFO.
        b'p'
    };
    put_bytes(hasher, rel.as_os_str().as_bytes());
    hasher.update(&[type_tag]);
    put_u64(hasher, u64::from(meta.mode() & 0o7777));
    put_u64(hasher, u64::from(meta.uid()));
    put_u64(hasher, u64::from(meta.gid()));
    put_u64(
        hasher,
        if matches!(type_tag, b'c' | b'b') {
            meta.rdev()
        } else {
            0
        },
    );
    hash_xattrs(hasher, abs)?;
    match type_tag {
        b'l' => {
            let target = fs::read_link(abs).map_err(|source| read_error(abs, source))?;
            put_bytes(hasher, target.as_os_str().as_bytes());
        }
        b'f' => hash_content(hasher, abs, meta, buf)?,
        _ => {}
    }
    Ok(())
}

fn hash_xattrs(hasher: &mut blake3::Hasher, path: &Path) -> Result<(), DigestError> {
    let names = match xattr::list(path) {
        Ok(names) => names.collect(),
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
        Err(source) => return Err(read_error(path, source)),
    };
    let mut xattrs = Vec::with_capacity(names.len());
    for name in names {
        // `None`: removed since the listing, so no longer part of the tree.
        if let Some(value) = xattr::get(path, &name).map_err(|source| read_error(path, source))? {
            xattrs.push((name, value));
        }
    }
    xattrs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    put_u64(hasher, xattrs.len() as u64);
    for (name, value) in &xattrs {
        put_bytes(hasher, name.as_bytes());
        put_bytes(hasher, value);
    }
    Ok(())
}

/// Hashes the size and then exactly that many bytes, failing if the file is not the one that
/// was listed or does not have that many bytes (or has more) by the time it is read.
fn hash_content(
    hasher: &mut blake3::Hasher,
    path: &Path,
    meta: &Metadata,
    buf: &mut [u8],
) -> Result<(), DigestError> {
    let changed = || DigestError::Changed {
        path: path.to_path_buf(),
    };
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| read_error(path, source))?;
    let opened = file.metadata().map_err(|source| read_error(path, source))?;
    if (opened.dev(), opened.ino(), opened.len()) != (meta.dev(), meta.ino(), meta.len()) {
        return Err(changed());
    }
    put_u64(hasher, meta.len());
    let mut remaining = meta.len();
    loop {
        let n = match file.read(buf) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(read_error(path, source)),
        };
        if n == 0 {
            break;
        }
        let n64 = n as u64;
        if n64 > remaining {
            return Err(changed());
        }
        hasher.update(&buf[..n]);
        remaining -= n64;
    }
    if remaining > 0 {
        return Err(changed());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    use nix::sys::stat::{self, Mode, SFlag, UtimensatFlags};
    use nix::sys::time::TimeSpec;

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it sets trusted.* xattrs and makes device nodes"
        );
    }

    fn build_layer(root: &Path) {
        fs::create_dir_all(root.join("etc/empty")).unwrap();
        fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(root.join("etc/shadow"), b"root:*::0:::::\n").unwrap();
        fs::set_permissions(root.join("etc/shadow"), fs::Permissions::from_mode(0o640)).unwrap();
        xattr::set(root.join("etc"), "trusted.overlay.opaque", b"y").unwrap();
        xattr::set(root.join("etc/passwd"), "user.note", b"n").unwrap();
        // Larger than the read buffer, so content is hashed in several pieces.
        let big: Vec<u8> = (0..3 * READ_BUFFER + 17).map(|i| i as u8).collect();
        fs::write(root.join("big"), big).unwrap();
        symlink("etc/passwd", root.join("link")).unwrap();
        stat::mknod(
            &root.join("whiteout"),
            SFlag::S_IFCHR,
            Mode::empty(),
            stat::makedev(0, 0),
        )
        .unwrap();
    }

    /// What a change is called and how to make it.
    type Change = (&'static str, fn(&Path));

    fn layer(set_up: impl FnOnce(&Path)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        build_layer(dir.path());
        set_up(dir.path());
        dir
    }

    fn digest(dir: &tempfile::TempDir) -> LayerDigest {
        layer_digest(dir.path()).unwrap()
    }

    #[test]
    fn same_tree_same_digest() {
        require_root();
        let a = layer(|_| {});
        let b = layer(|root| {
            // Different mtimes and inodes, same tree.
            let old = TimeSpec::new(1_000_000_000, 0);
            for path in ["etc", "etc/passwd", "link", "big"] {
                stat::utimensat(
                    None,
                    &root.join(path),
                    &old,
                    &old,
                    UtimensatFlags::NoFollowSymlink,
                )
                .unwrap();
            }
        });
        assert_eq!(digest(&a), digest(&b));
        let text = digest(&a).to_string();
        assert_eq!(LayerDigest::parse(&text).unwrap(), digest(&a));
        assert_eq!(text, digest(&a).as_str());
    }

    #[test]
    fn any_change_changes_the_digest() {
        require_root();
        let base = digest(&layer(|_| {}));
        let changes: [Change; 8] = [
            ("one byte", |root| {
                fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sH\n").unwrap()
            }),
            ("mode", |root| {
                fs::set_permissions(root.join("etc/shadow"), fs::Permissions::from_mode(0o600))
                    .unwrap()
            }),
            ("owner", |root| {
                nix::unistd::chown(&root.join("big"), Some(nix::unistd::Uid::from_raw(1)), None)
                    .unwrap()
            }),
            ("xattr value", |root| {
                xattr::set(root.join("etc/passwd"), "user.note", b"m").unwrap()
            }),
            ("xattr removed", |root| {
                xattr::remove(root.join("etc"), "trusted.overlay.opaque").unwrap()
            }),
            ("rename", |root| {
                fs::rename(root.join("etc/shadow"), root.join("etc/shadoW")).unwrap()
            }),
            ("link target", |root| {
                fs::remove_file(root.join("link")).unwrap();
                symlink("etc/shadow", root.join("link")).unwrap();
            }),
            ("empty dir", |root| {
                fs::create_dir(root.join("new")).unwrap()
            }),
        ];
        for (what, change) in changes {
            assert_ne!(base, digest(&layer(change)), "{what}");
        }
    }

    #[test]
    fn sockets_are_not_part_of_a_layer() {
        require_root();
        let base = digest(&layer(|_| {}));
        let with_socket = layer(|root| {
            std::os::unix::net::UnixListener::bind(root.join("etc/socket")).unwrap();
        });
        assert_eq!(digest(&with_socket), base);

        // What the archive carries of it verifies on the other side.
        let (archive, _) =
            crate::rootfs::archive::pack_dir(with_socket.path(), Vec::new()).unwrap();
        let copy = tempfile::tempdir().unwrap();
        let policy = crate::rootfs::archive::UnpackPolicy::strict();
        crate::rootfs::archive::unpack_dir(archive.as_slice(), copy.path(), &policy).unwrap();
        assert!(!copy.path().join("etc/socket").exists());
        assert_eq!(digest(&copy), base);
    }

    #[test]
    fn parse_accepts_only_canonical_digests() {
        let hex = "0123456789abcdef".repeat(4);
        assert!(LayerDigest::parse(&format!("b3:{hex}")).is_ok());
        for bad in [
            "b3:../x".to_owned(),
            format!("b3:{}", hex.to_uppercase()),
            format!("b3:{}", &hex[1..]),
            format!("b3:{hex}0"),
            format!("b3:{}/", &hex[1..]),
            format!("sha256:{hex}"),
            hex.clone(),
            format!("b3:{}g", &hex[1..]),
            String::new(),
        ] {
            assert!(
                matches!(LayerDigest::parse(&bad), Err(DigestError::Parse { .. })),
                "{bad:?}"
            );
        }
    }
}
