//! Raw tar archives built byte by byte: headers, PAX records, sizes and endings a hostile sender would choose.

#![allow(clippy::unwrap_used)]

pub(crate) const BLOCK: usize = 512;
/// Stands for the absolute path of the directory beside the destination in names and link
/// targets; replaced when an archive is built.
pub(crate) const OUTSIDE: &[u8] = b"@OUTSIDE@";

// --- Building archives byte by byte ----------------------------------------------------

/// Writes `value` as the NUL-terminated octal tar uses, or base-256 when it does not fit.
pub(crate) fn put_number(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    if text.len() <= digits {
        field[..digits].copy_from_slice(text.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        let bytes = value.to_be_bytes();
        let width = field.len();
        let n = bytes.len().min(width - 1);
        field[width - n..].copy_from_slice(&bytes[bytes.len() - n..]);
        field[0] |= 0x80;
    }
}

pub(crate) fn put_bytes(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
    field[n..].fill(0);
}

/// The checksum tar's readers expect: unsigned bytes, the checksum field counted as spaces.
pub(crate) fn set_checksum(block: &mut [u8]) {
    block[148..156].fill(b' ');
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

pub(crate) fn looks_like_header(block: &[u8]) -> bool {
    &block[257..262] == b"ustar"
}

/// Recomputes the checksum of every block that looks like a header.
pub(crate) fn fix_checksums(archive: &mut [u8]) {
    for block in archive.chunks_exact_mut(BLOCK) {
        if looks_like_header(block) {
            set_checksum(block);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Gnu,
    /// ustar, whose prefix field the reader puts before the name.
    Ustar,
}

/// One header block.
#[allow(clippy::too_many_arguments)]
pub(crate) fn header(
    format: Format,
    name: &[u8],
    kind: u8,
    link: &[u8],
    mode: u64,
    size: u64,
    dev: (u64, u64),
    prefix: &[u8],
) -> [u8; BLOCK] {
    let mut block = [0u8; BLOCK];
    put_bytes(&mut block[0..100], name);
    put_number(&mut block[100..108], mode);
    // Owned by whoever unpacks, so that an unprivileged run can set the owner too.
    put_number(
        &mut block[108..116],
        u64::from(nix::unistd::geteuid().as_raw()),
    );
    put_number(
        &mut block[116..124],
        u64::from(nix::unistd::getegid().as_raw()),
    );
    put_number(&mut block[124..136], size);
    put_number(&mut block[136..148], 1_700_000_000);
    block[156] = kind;
    put_bytes(&mut block[157..257], link);
    match format {
        Format::Gnu => block[257..265].copy_from_slice(b"ustar  \0"),
        Format::Ustar => {
            block[257..265].copy_from_slice(b"ustar\x0000");
            put_bytes(&mut block[345..500], prefix);
        }
    }
    put_number(&mut block[329..337], dev.0);
    put_number(&mut block[337..345], dev.1);
    set_checksum(&mut block);
    block
}

pub(crate) fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(BLOCK), 0);
}

/// A PAX record, its length counting itself.
pub(crate) fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut digits = 1;
    while (rest + digits).to_string().len() > digits {
        digits += 1;
    }
    let mut record = format!("{} ", rest + digits).into_bytes();
    record.extend_from_slice(key);
    record.push(b'=');
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

/// What an entry's size field says, against the data that follows it.
#[derive(Debug, Clone)]
pub(crate) enum SizeField {
    /// The data's length.
    Data,
    Value(u64),
}

/// A hostile entry: any name, type, mode, size, link target, device number and PAX records.
#[derive(Debug, Clone)]
pub(crate) struct Raw {
    pub(crate) format: Format,
    pub(crate) name: Vec<u8>,
    /// ustar only.
    pub(crate) prefix: Vec<u8>,
    pub(crate) kind: u8,
    pub(crate) link: Vec<u8>,
    pub(crate) mode: u64,
    pub(crate) size: SizeField,
    pub(crate) data: usize,
    pub(crate) dev: (u64, u64),
    /// Whole records; an odd one may be malformed.
    pub(crate) pax: Vec<Vec<u8>>,
}

impl Raw {
    pub(crate) fn plain(name: &[u8], kind: u8) -> Self {
        Self {
            format: Format::Gnu,
            name: name.to_vec(),
            prefix: Vec::new(),
            kind,
            link: Vec::new(),
            mode: 0o644,
            size: SizeField::Data,
            data: if kind == b'0' { 4 } else { 0 },
            dev: (0, 0),
            pax: Vec::new(),
        }
    }

    pub(crate) fn link(mut self, target: &[u8]) -> Self {
        self.link = target.to_vec();
        self
    }

    pub(crate) fn mode(mut self, mode: u64) -> Self {
        self.mode = mode;
        self
    }

    pub(crate) fn dev(mut self, major: u64, minor: u64) -> Self {
        self.dev = (major, minor);
        self
    }

    pub(crate) fn pax(mut self, key: &[u8], value: &[u8]) -> Self {
        self.pax.push(pax_record(key, value));
        self
    }

    /// Appends the entry: long-name entries for a name or link beyond its field, a PAX
    /// header for the records, the header, then the data.
    pub(crate) fn write(&self, out: &mut Vec<u8>, outside: &[u8]) {
        let name = replace(&self.name, outside);
        let link = replace(&self.link, outside);
        for (long, kind) in [(&name, b'L'), (&link, b'K')] {
            if long.len() > 100 && self.format == Format::Gnu {
                let size = long.len() as u64 + 1;
                out.extend_from_slice(&header(
                    Format::Gnu,
                    b"././@LongLink",
                    kind,
                    b"",
                    0o644,
                    size,
                    (0, 0),
                    b"",
                ));
                out.extend_from_slice(long);
                out.push(0);
                pad(out);
            }
        }
        if !self.pax.is_empty() {
            let records: Vec<u8> = self.pax.concat();
            let records = replace(&records, outside);
            out.extend_from_slice(&header(
                self.format,
                b"PaxHeaders/x",
                b'x',
                b"",
                0o644,
                records.len() as u64,
                (0, 0),
                b"",
            ));
            out.extend_from_slice(&records);
            pad(out);
        }
        let size = match self.size {
            SizeField::Data => self.data as u64,
            SizeField::Value(v) => v,
        };
        out.extend_from_slice(&header(
            self.format,
            &name,
            self.kind,
            &link,
            self.mode,
            size,
            self.dev,
            &self.prefix,
        ));
        out.extend((0..self.data).map(|i| b"evil"[i % 4]));
        pad(out);
    }
}

/// `bytes` with every [`OUTSIDE`] replaced by `outside`.
pub(crate) fn replace(bytes: &[u8], outside: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(at) = rest.windows(OUTSIDE.len()).position(|w| w == OUTSIDE) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(outside);
        rest = &rest[at + OUTSIDE.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// How a built archive ends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ending {
    Marker,
    OneZeroBlock,
    Nothing,
    /// Cut inside the last block.
    Torn(u16),
}

pub(crate) fn build(entries: &[Raw], ending: Ending, outside: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        entry.write(&mut out, outside);
    }
    match ending {
        Ending::Marker => out.resize(out.len() + 2 * BLOCK, 0),
        Ending::OneZeroBlock => out.resize(out.len() + BLOCK, 0),
        Ending::Nothing => {}
        Ending::Torn(n) => out.truncate(out.len().saturating_sub(usize::from(n) % BLOCK + 1)),
    }
    out
}

// --- The scratch directory -------------------------------------------------------------
