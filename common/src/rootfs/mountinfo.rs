//! Parsing `/proc/<pid>/mountinfo` (proc(5)): pure functions over its text, so
//! they are tested without root.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options, e.g. overlay's `lowerdir=...,upperdir=...`,
    /// with mountinfo's octal escapes already decoded.
    pub super_options: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MountInfoError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed mountinfo line: {line:?}")]
    Malformed { line: String },
}

/// Reads and parses the mount table of this process's mount namespace.
pub fn read_own() -> Result<Vec<MountEntry>, MountInfoError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| MountInfoError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text)
}

pub fn parse(text: &str) -> Result<Vec<MountEntry>, MountInfoError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Result<MountEntry, MountInfoError> {
    let malformed = || MountInfoError::Malformed {
        line: line.to_owned(),
    };
    let (before, after) = line.split_once(" - ").ok_or_else(malformed)?;
    let fields: Vec<&str> = before.split(' ').collect();
    if fields.len() < 6 {
        return Err(malformed());
    }
    let tail: Vec<&str> = after.split(' ').collect();
    if tail.len() < 3 {
        return Err(malformed());
    }
    Ok(MountEntry {
        mount_id: fields[0].parse().map_err(|_| malformed())?,
        parent_id: fields[1].parse().map_err(|_| malformed())?,
        mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
        fs_type: tail[0].to_owned(),
        source: String::from_utf8_lossy(&unescape(tail[1])).into_owned(),
        super_options: String::from_utf8_lossy(&unescape(tail[2])).into_owned(),
    })
}

/// Decodes the kernel's `\NNN` octal escapes (space, tab, newline, backslash).
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Mounts at `dir` or below it, deepest first: the order to unmount them in.
pub fn mounts_under<'a>(entries: &'a [MountEntry], dir: &Path) -> Vec<&'a MountEntry> {
    let mut found: Vec<&MountEntry> = entries
        .iter()
        .filter(|e| e.mount_point.starts_with(dir))
        .collect();
    found.sort_by_key(|e| std::cmp::Reverse(e.mount_point.components().count()));
    found
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 0:52 / /tmp/exp/merged rw,relatime shared:50 - overlay overlay rw,lowerdir=/tmp/exp/lower,upperdir=/tmp/exp/upper,workdir=/tmp/exp/work
99 22 0:53 / /var/lib/my\\040dir/rootfs rw,relatime - overlay overlay rw,lowerdir=/l\\0401:/l2,upperdir=/u,workdir=/w
100 99 0:54 / /var/lib/my\\040dir/rootfs/proc rw - proc proc rw
";

    #[test]
    fn parses_overlay_entries_and_escapes() {
        let entries = parse(SAMPLE).unwrap();
        assert_eq!(entries.len(), 4);
        let merged = &entries[1];
        assert_eq!(merged.mount_id, 98);
        assert_eq!(merged.parent_id, 22);
        assert_eq!(merged.mount_point, PathBuf::from("/tmp/exp/merged"));
        assert_eq!(merged.fs_type, "overlay");
        assert!(merged.super_options.contains("upperdir=/tmp/exp/upper"));
        let spaced = &entries[2];
        assert_eq!(spaced.mount_point, PathBuf::from("/var/lib/my dir/rootfs"));
        assert!(spaced.super_options.contains("lowerdir=/l 1:/l2"));
    }

    #[test]
    fn optional_fields_do_not_confuse_the_parser() {
        let line = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue";
        let e = parse(line).unwrap().remove(0);
        assert_eq!(e.mount_point, PathBuf::from("/mnt2"));
        assert_eq!(e.fs_type, "ext3");
        assert_eq!(e.source, "/dev/root");
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(parse("garbage\n").is_err());
        assert!(parse("1 2 3 4 5 6 - onlytype\n").is_err());
    }

    #[test]
    fn mounts_under_lists_deepest_first() {
        let entries = parse(SAMPLE).unwrap();
        let found = mounts_under(&entries, Path::new("/var/lib/my dir"));
        let points: Vec<_> = found.iter().map(|e| e.mount_point.clone()).collect();
        assert_eq!(
            points,
            [
                PathBuf::from("/var/lib/my dir/rootfs/proc"),
                PathBuf::from("/var/lib/my dir/rootfs")
            ]
        );
        assert!(mounts_under(&entries, Path::new("/var/lib/my")).is_empty());
    }
}
