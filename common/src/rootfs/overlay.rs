//! Finding the overlay mount that is a container's rootfs, and its layers.

use std::path::{Path, PathBuf};

use super::mountinfo::{self, MountEntry, MountInfoError};

/// An overlayfs mount: read-only lower layers (uppermost first, as in
/// `lowerdir`), the writable upper dir, and overlay's work dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayMount {
    pub mount_point: PathBuf,
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(transparent)]
    MountInfo(#[from] MountInfoError),
    #[error("resolving rootfs path {path}")]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nothing is mounted at the container's rootfs {path}: migrate needs the rootfs to be an overlay mount")]
    NotMounted { path: PathBuf },
    #[error("the container's rootfs {path} is a {fs_type} mount, not overlay: migrate moves overlay rootfs only")]
    NotOverlay { path: PathBuf, fs_type: String },
    #[error("overlay at {path} has options migrate cannot use ({detail}): {options}")]
    Options {
        path: PathBuf,
        detail: &'static str,
        options: String,
    },
}

impl OverlayMount {
    /// The overlay mounted at `rootfs` in this process's mount namespace.
    pub fn find(rootfs: &Path) -> Result<Self, OverlayError> {
        let resolved = std::fs::canonicalize(rootfs).map_err(|source| OverlayError::Resolve {
            path: rootfs.to_owned(),
            source,
        })?;
        let entries = mountinfo::read_own()?;
        Self::from_entries(&entries, &resolved)
    }

    /// The topmost mount at `mount_point` among `entries` (later entries
    /// shadow earlier ones at the same place).
    pub fn from_entries(entries: &[MountEntry], mount_point: &Path) -> Result<Self, OverlayError> {
        let entry = entries
            .iter()
            .rev()
            .find(|e| e.mount_point == mount_point)
            .ok_or_else(|| OverlayError::NotMounted {
                path: mount_point.to_owned(),
            })?;
        if entry.fs_type != "overlay" {
            return Err(OverlayError::NotOverlay {
                path: mount_point.to_owned(),
                fs_type: entry.fs_type.clone(),
            });
        }
        Self::from_options(mount_point, &entry.super_options)
    }

    /// Parses overlay's super options (`lowerdir=a:b,upperdir=u,workdir=w`,
    /// or the `lowerdir+=` form newer mount APIs produce).
    pub fn from_options(mount_point: &Path, options: &str) -> Result<Self, OverlayError> {
        let bad = |detail| OverlayError::Options {
            path: mount_point.to_owned(),
            detail,
            options: options.to_owned(),
        };
        let mut lowers = Vec::new();
        let mut upper = None;
        let mut work = None;
        for opt in split_escaped(options, ',') {
            if let Some(list) = opt.strip_prefix("lowerdir=") {
                if list.contains("::") {
                    return Err(bad("data-only lower layers"));
                }
                lowers.extend(split_escaped(list, ':').iter().map(|l| unescape(l)));
            } else if let Some(dir) = opt.strip_prefix("lowerdir+=") {
                lowers.push(unescape(dir));
            } else if let Some(dir) = opt.strip_prefix("upperdir=") {
                upper = Some(unescape(dir));
            } else if let Some(dir) = opt.strip_prefix("workdir=") {
                work = Some(unescape(dir));
            } else if opt.starts_with("datadir+=") {
                return Err(bad("data-only lower layers"));
            }
        }
        let upper =
            upper.ok_or_else(|| bad("no upperdir: a read-only overlay has no changes to move"))?;
        let work = work.ok_or_else(|| bad("no workdir"))?;
        if lowers.is_empty() {
            return Err(bad("no lowerdir"));
        }
        if !lowers
            .iter()
            .chain([&upper, &work])
            .all(|p| p.is_absolute())
        {
            return Err(bad("relative layer paths"));
        }
        Ok(Self {
            mount_point: mount_point.to_owned(),
            lowers,
            upper,
            work,
        })
    }
}

/// Splits on `sep` except where it is escaped with a backslash (overlay
/// escapes `,` and `:` inside paths that way), keeping the escapes: an
/// option's value is split again (`lowerdir`'s `:`) before it is
/// unescaped, so `b3\:<hex>` stays one layer.
fn split_escaped(text: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                current.push('\\');
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            c if c == sep => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts
}

/// One path with overlay's escapes (`\,`, `\:`, `\\`) removed.
fn unescape(text: &str) -> PathBuf {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some(next @ (',' | ':' | '\\'))) => {
                out.push(next);
                chars.next();
            }
            (c, _) => out.push(c),
        }
    }
    PathBuf::from(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_lowerdir_list_in_order() {
        let o = OverlayMount::from_options(
            Path::new("/m"),
            "rw,lowerdir=/l/top:/l/base,upperdir=/u,workdir=/w,index=off",
        )
        .unwrap();
        assert_eq!(
            o.lowers,
            [PathBuf::from("/l/top"), PathBuf::from("/l/base")]
        );
        assert_eq!(o.upper, PathBuf::from("/u"));
        assert_eq!(o.work, PathBuf::from("/w"));
    }

    #[test]
    fn parses_lowerdir_plus_form_and_escapes() {
        let o = OverlayMount::from_options(
            Path::new("/m"),
            "rw,lowerdir+=/l/a\\:b,lowerdir+=/l/c,upperdir=/u\\,x,workdir=/w",
        )
        .unwrap();
        assert_eq!(o.lowers, [PathBuf::from("/l/a:b"), PathBuf::from("/l/c")]);
        assert_eq!(o.upper, PathBuf::from("/u,x"));
    }

    /// A destination's layer store names layers `b3:<hex>`: a container it
    /// restored, moving on, has lower dirs with an escaped colon.
    #[test]
    fn an_escaped_colon_in_a_lowerdir_list_stays_in_its_path() {
        let o = OverlayMount::from_options(
            Path::new("/m"),
            "rw,lowerdir=/s/layers/b3\\:ab:/l/base\\\\x,upperdir=/u,workdir=/w",
        )
        .unwrap();
        assert_eq!(
            o.lowers,
            [
                PathBuf::from("/s/layers/b3:ab"),
                PathBuf::from("/l/base\\x")
            ]
        );
    }

    #[test]
    fn refuses_what_cannot_be_moved() {
        for opts in [
            "rw,lowerdir=/a:/b",
            "rw,lowerdir=/a::/data,upperdir=/u,workdir=/w",
            "rw,upperdir=/u,workdir=/w",
            "rw,lowerdir=rel,upperdir=/u,workdir=/w",
        ] {
            assert!(
                OverlayMount::from_options(Path::new("/m"), opts).is_err(),
                "{opts}"
            );
        }
    }

    #[test]
    fn finds_topmost_mount_and_rejects_non_overlay() {
        let entries = mountinfo::parse(
            "1 0 0:1 / / rw - ext4 /dev/vda rw\n\
             2 1 0:2 / /c/rootfs rw - ext4 /dev/vdb rw\n\
             3 2 0:3 / /c/rootfs rw - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n\
             4 1 0:4 / /d/rootfs rw - tmpfs tmpfs rw\n",
        )
        .unwrap();
        let o = OverlayMount::from_entries(&entries, Path::new("/c/rootfs")).unwrap();
        assert_eq!(o.upper, PathBuf::from("/u"));
        assert!(matches!(
            OverlayMount::from_entries(&entries, Path::new("/d/rootfs")),
            Err(OverlayError::NotOverlay { .. })
        ));
        assert!(matches!(
            OverlayMount::from_entries(&entries, Path::new("/e")),
            Err(OverlayError::NotMounted { .. })
        ));
    }
}
