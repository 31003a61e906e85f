//! Extended attributes of every namespace as PAX records.
//!
//! `SCHILY.xattr.<name>` with the raw value is used whenever the `tar` crate's PAX reader can
//! round-trip it; that reader splits records at `\n` rather than honouring their length
//! prefix, so a name containing `=` or `\n` or non-UTF-8 bytes, or a value containing `\n`
//! (binary ones such as `trusted.overlay.origin`, ACLs or file capabilities easily do), is
//! written in libarchive's `LIBARCHIVE.xattr.<percent-encoded name>=<base64 value>` form
//! instead (standard alphabet, unpadded as libarchive writes it; padded values are read too).

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use percent_encoding::{percent_decode, percent_encode, AsciiSet, CONTROLS};

/// An entry's xattrs, sorted by name.
pub(super) type Xattrs = Vec<(OsString, Vec<u8>)>;

pub(super) const SCHILY_XATTR: &str = "SCHILY.xattr.";
pub(super) const LIBARCHIVE_XATTR: &str = "LIBARCHIVE.xattr.";
/// What libarchive escapes in xattr names: everything but printable ASCII (the crate always
/// escapes non-ASCII bytes), and `%` and `=`, which would break the escaping or the record.
const XATTR_NAME_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'=');
/// libarchive writes xattr values without padding and its reader takes them either way.
const XATTR_VALUE_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// All xattrs of `path`, not following a symlink there.
pub(super) fn read(path: &Path) -> io::Result<Xattrs> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut xattrs = Vec::new();
    for name in names {
        // `None` means it was removed since the listing; there is nothing left to copy.
        if let Some(value) = xattr::get(path, &name)? {
            xattrs.push((name, value));
        }
    }
    xattrs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(xattrs)
}

/// The PAX records that carry `xattrs`.
pub(super) fn pax_records(xattrs: &[(OsString, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    xattrs
        .iter()
        .map(|(name, value)| {
            let raw_name = std::str::from_utf8(name.as_bytes())
                .ok()
                .filter(|n| !n.contains(['=', '\n']));
            match raw_name {
                Some(n) if !value.contains(&b'\n') => (format!("{SCHILY_XATTR}{n}"), value.clone()),
                _ => (
                    format!(
                        "{LIBARCHIVE_XATTR}{}",
                        percent_encode(name.as_bytes(), XATTR_NAME_ESCAPES)
                    ),
                    XATTR_VALUE_BASE64.encode(value).into_bytes(),
                ),
            }
        })
        .collect()
}

/// The xattr a PAX record carries, `None` if the record is not about an xattr.
pub(super) fn from_pax_record(key: &[u8], value: &[u8]) -> Option<io::Result<(OsString, Vec<u8>)>> {
    if let Some(name) = key.strip_prefix(SCHILY_XATTR.as_bytes()) {
        return Some(Ok((OsString::from_vec(name.to_vec()), value.to_vec())));
    }
    let encoded = key.strip_prefix(LIBARCHIVE_XATTR.as_bytes())?;
    // Like libarchive's reader, a `%` without two hex digits stands for itself.
    let name = OsString::from_vec(percent_decode(encoded).collect());
    Some(
        XATTR_VALUE_BASE64
            .decode(value)
            .map(|value| (name, value))
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err)),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A value with `\n`, `=`, NUL and non-UTF-8 bytes, like overlayfs's binary xattrs.
    const BINARY: &[u8] = b"\x00\x0a\xfb\x0a\n=\xff";

    #[test]
    fn records_round_trip_in_the_form_each_needs() {
        let xattrs = vec![
            (OsString::from("user.plain"), b"text = fine".to_vec()),
            (OsString::from("trusted.overlay.origin"), BINARY.to_vec()),
            (
                OsString::from_vec(b"user.a=b c%\n\xff".to_vec()),
                b"foob".to_vec(),
            ),
        ];
        let records = pax_records(&xattrs);
        let keys: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "SCHILY.xattr.user.plain",
                "LIBARCHIVE.xattr.trusted.overlay.origin",
                // Byte for byte what bsdtar writes: escaped name, unpadded base64.
                "LIBARCHIVE.xattr.user.a%3Db%20c%25%0A%FF",
            ]
        );
        assert_eq!(records[2].1, b"Zm9vYg");
        let back: Vec<_> = records
            .iter()
            .map(|(k, v)| from_pax_record(k.as_bytes(), v).unwrap().unwrap())
            .collect();
        assert_eq!(back, xattrs);
    }

    #[test]
    fn decoding_takes_padding_and_refuses_broken_base64() {
        let padded = from_pax_record(b"LIBARCHIVE.xattr.user.p", b"Zm9vYg==").unwrap();
        assert_eq!(
            padded.unwrap(),
            (OsString::from("user.p"), b"foob".to_vec())
        );
        let broken = from_pax_record(b"LIBARCHIVE.xattr.user.b", b"Zm9vY").unwrap();
        assert_eq!(broken.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(from_pax_record(b"MIGRATE.remove", b"1").is_none());
    }
}
