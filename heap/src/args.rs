//! Command line: `migrate-heap --size 512M [--dirty 16M] [--beat-ms 10]
//! [--status PATH] [--seed N] [--reads N]`.

use std::path::PathBuf;

pub const USAGE: &str = "\
usage: migrate-heap --size SIZE [--dirty RATE] [--beat-ms MS] [--status PATH] [--seed N] [--reads N]

Allocates an anonymous heap of SIZE bytes, fills it with content that
compresses like a real heap (about 3.5x with zstd level 1), rewrites RATE
bytes of it per second, and every beat writes a JSON status file (atomically)
with the longest gap between two beats it has seen. SIGUSR1 verifies every
page and records the result in the status; SIGUSR2 starts measuring the
longest gap afresh; SIGTERM or SIGINT ends it.

  --size SIZE     heap size: bytes, or with K, M, G, T (binary: 1K = 1024), e.g. 512M
  --dirty RATE    bytes per second to rewrite, spread over the heap (same units,
                  an optional /s); 0 = idle (default)
  --beat-ms MS    interval between beats, default 10
  --status PATH   status file, default /heap/status.json (its directory is created)
  --seed N        content seed, default 1
  --reads N       random pages read (and checked) per beat, default 4
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub size: u64,
    pub dirty_per_sec: u64,
    pub beat_ms: u64,
    pub status: PathBuf,
    pub seed: u64,
    pub reads_per_beat: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Options),
    Help,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut size = None;
    let mut opts = Options {
        size: 0,
        dirty_per_sec: 0,
        beat_ms: 10,
        status: PathBuf::from("/heap/status.json"),
        seed: 1,
        reads_per_beat: 4,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Parsed::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--size" => size = Some(parse_size(&value()?)?),
            "--dirty" => opts.dirty_per_sec = parse_rate(&value()?)?,
            "--beat-ms" => opts.beat_ms = parse_number(&name, &value()?)?,
            "--status" => opts.status = PathBuf::from(value()?),
            "--seed" => opts.seed = parse_number(&name, &value()?)?,
            "--reads" => opts.reads_per_beat = parse_number(&name, &value()?)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    opts.size = size.ok_or("--size is required")?;
    if opts.size == 0 {
        return Err("--size must be more than 0".into());
    }
    if opts.beat_ms == 0 {
        return Err("--beat-ms must be at least 1".into());
    }
    Ok(Parsed::Run(opts))
}

fn parse_number(name: &str, s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("{name}: {s:?} is not a whole number"))
}

/// `4096`, `64K`, `512M`, `2G`, `1T`, also `512MiB`, `512MB`, `512m`
/// (binary units all).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (e.g. 4096, 64K, 512M, 2G)");
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(bad());
    }
    let number: u64 = s[..digits].parse().map_err(|_| bad())?;
    let unit = s[digits..].to_ascii_uppercase();
    let prefix = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let shift = match prefix {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    if unit.ends_with("IB") && shift == 0 {
        return Err(bad());
    }
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// A size per second: `16M`, `16M/s`, `0`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    parse_size(s.strip_suffix("/s").unwrap_or(s))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Parsed, String> {
        parse(a.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in [
            "",
            "M",
            "1.5G",
            "12X",
            "-1",
            "1 G",
            "iB",
            "5iB",
            "5BB",
            "99999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("16M"), Ok(16 << 20));
        assert_eq!(parse_rate("16M/s"), Ok(16 << 20));
        assert_eq!(parse_rate("0"), Ok(0));
        assert!(parse_rate("/s").is_err());
        assert!(parse_rate("16M/h").is_err());
    }

    #[test]
    fn defaults_and_every_option() {
        let Ok(Parsed::Run(o)) = args(&["--size", "64M"]) else {
            panic!("--size alone should parse")
        };
        assert_eq!(o.size, 64 << 20);
        assert_eq!(o.dirty_per_sec, 0);
        assert_eq!(o.beat_ms, 10);
        assert_eq!(o.status, PathBuf::from("/heap/status.json"));
        assert_eq!(o.seed, 1);
        assert_eq!(o.reads_per_beat, 4);

        let parsed = args(&[
            "--size=2G",
            "--dirty",
            "16M/s",
            "--beat-ms",
            "5",
            "--status",
            "/tmp/s.json",
            "--seed=9",
            "--reads",
            "0",
        ]);
        assert_eq!(
            parsed,
            Ok(Parsed::Run(Options {
                size: 2 << 30,
                dirty_per_sec: 16 << 20,
                beat_ms: 5,
                status: PathBuf::from("/tmp/s.json"),
                seed: 9,
                reads_per_beat: 0,
            }))
        );
    }

    #[test]
    fn errors_and_help() {
        assert_eq!(args(&["--help"]), Ok(Parsed::Help));
        assert_eq!(args(&["--size", "1M", "-h"]), Ok(Parsed::Help));
        assert!(args(&[]).unwrap_err().contains("--size is required"));
        assert!(args(&["--size"]).unwrap_err().contains("needs a value"));
        assert!(args(&["--size", "0"]).is_err());
        assert!(args(&["--size", "1M", "--beat-ms", "0"]).is_err());
        assert!(args(&["--size", "1M", "--seed", "x"]).is_err());
        assert!(args(&["--size", "1M", "--frobnicate"])
            .unwrap_err()
            .contains("unknown argument"));
    }
}
