//! `--max-bandwidth`'s value: a rate in bytes per second, written as a size
//! with bytesize's units (`100MiB`, `125M`, `1G`: K, M, G are powers of
//! 1000, Ki, Mi, Gi powers of 1024), optionally followed by `/s`; or in bits
//! as links are sold (`1Gbit`, `800Mbit`: the same prefixes, divided by 8).

/// Bytes per second, or why `text` is not a rate.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let per_second = trimmed.strip_suffix("/s").unwrap_or(trimmed).trim_end();
    let lower = per_second.to_ascii_lowercase();
    let (size, bits) = match lower.strip_suffix("bit") {
        Some(prefix) => (&per_second[..prefix.len()], true),
        None => (per_second, false),
    };
    let bytes = size
        .parse::<bytesize::ByteSize>()
        .map_err(|e| format!("{text:?} is not a rate (e.g. 100MiB, 125M, 1Gbit): {e}"))?
        .as_u64();
    let rate = if bits { bytes / 8 } else { bytes };
    if rate == 0 {
        return Err(format!(
            "{text:?}: a rate of zero bytes per second moves nothing"
        ));
    }
    Ok(rate)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_per_second() {
        assert_eq!(parse_rate("100MiB").unwrap(), 100 << 20);
        assert_eq!(parse_rate("125M").unwrap(), 125_000_000);
        assert_eq!(parse_rate("20 MiB/s").unwrap(), 20 << 20);
        assert_eq!(parse_rate("4096").unwrap(), 4096);
    }

    #[test]
    fn bits_per_second() {
        assert_eq!(parse_rate("1Gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("800Mbit/s").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1Gibit").unwrap(), (1 << 30) / 8);
    }

    #[test]
    fn nonsense_and_zero_are_refused() {
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 furlongs").is_err());
        assert!(parse_rate("0").unwrap_err().contains("zero"));
        assert!(parse_rate("4bit").unwrap_err().contains("zero"));
    }
}
