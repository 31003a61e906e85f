//! The `criu` binary: version, `criu check` and feature probes, the CPU
//! check between two hosts (`criu cpuinfo`), the kernel setting its page
//! pipes need, and reading the tail of its logs for error messages. Submodules: the per-migration configuration file ([`config`]),
//! its page-server protocol ([`page_server`]), its dump statistics
//! ([`stats`]) and the destination's lazy-pages daemon ([`lazy`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{run, ToolError};
use crate::protocol::MAX_CPUINFO_BYTES;

pub mod config;
pub mod lazy;
pub mod page_server;
pub mod stats;

pub use config::ConfigFile;

/// Oldest CRIU we accept on either side: 3.x fails `criu check` on recent
/// kernels, and 4.1 cannot dump TCP/UDP sockets on kernels >= 6.16.
pub const MIN_VERSION: CriuVersion = CriuVersion {
    major: 4,
    minor: 2,
    patch: 0,
};

/// How many lines of a CRIU log an error message quotes.
pub const LOG_TAIL_LINES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("cannot parse CRIU version from {output:?}")]
    Version { output: String },
    #[error("criu check failed on this host:\n{output}")]
    CheckFailed { output: String },
    #[error("{what} {PIPE_MAX_SIZE}")]
    Sysctl {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{message}\nCRIU {log}")]
    Lazy { message: String, log: String },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating a temporary directory for CRIU's cpuinfo image")]
    TempDir(#[source] std::io::Error),
    #[error("a cpuinfo image of {len} bytes is more than the {max} bytes one may have")]
    CpuinfoTooLarge { len: u64, max: usize },
    #[error("this host's CPU lacks what the source's CPU offers its processes (criu cpuinfo check):\n{output}")]
    CpuMismatch { output: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CriuVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl CriuVersion {
    /// Parses `criu --version` output ("Version: 4.2.1", possibly followed by
    /// a "GitID:" line).
    pub fn parse(output: &str) -> Option<Self> {
        let line = output
            .lines()
            .find_map(|l| l.trim().strip_prefix("Version:"))?;
        let mut parts = line.trim().split(['.', '-']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Self {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The CRIU binary runc will use.
#[derive(Debug, Clone)]
pub struct Criu {
    pub binary: PathBuf,
}

impl Criu {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
        }
    }

    pub fn version(&self) -> Result<CriuVersion, CriuError> {
        let out = run(Command::new(&self.binary).arg("--version"))?;
        CriuVersion::parse(&out).ok_or(CriuError::Version { output: out })
    }

    /// `criu check`: whether this kernel supports what checkpoint/restore
    /// needs.
    pub fn check(&self) -> Result<(), CriuError> {
        match run(Command::new(&self.binary).arg("check")) {
            Ok(_) => Ok(()),
            Err(ToolError::Failed { output, .. }) => Err(CriuError::CheckFailed { output }),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether iterative pre-dumps can work here: they need the kernel's
    /// soft-dirty memory tracking.
    pub fn supports_dirty_tracking(&self) -> bool {
        self.has_feature("mem_dirty_track")
    }

    /// Whether a lazy restore can work here: the lazy-pages daemon needs
    /// userfaultfd with non-cooperative events.
    pub fn supports_lazy_pages(&self) -> bool {
        self.has_feature("uffd-noncoop")
    }

    /// `criu cpuinfo dump`: this host's CPU as CRIU records it in a dump
    /// (the bytes of `cpuinfo.img`), for a destination to check against
    /// its own with [`Criu::cpuinfo_check`]; empty where CRIU writes none.
    pub fn cpuinfo_dump(&self) -> Result<Vec<u8>, CriuError> {
        let dir = tempfile::tempdir().map_err(CriuError::TempDir)?;
        run(Command::new(&self.binary)
            .args(["cpuinfo", "dump", "-D"])
            .arg(dir.path()))?;
        let path = dir.path().join(CPUINFO_IMAGE);
        let read = |source| CriuError::Read {
            path: path.clone(),
            source,
        };
        let len = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            // Only x86 CRIU records the CPU; elsewhere the destination hears
            // no image and says its CPU was not checked.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(read(e)),
        };
        if len > MAX_CPUINFO_BYTES as u64 {
            return Err(CriuError::CpuinfoTooLarge {
                len,
                max: MAX_CPUINFO_BYTES,
            });
        }
        std::fs::read(&path).map_err(read)
    }

    /// `criu cpuinfo check` of another host's `cpuinfo.img` (as
    /// [`Criu::cpuinfo_dump`] made it): whether processes dumped there can
    /// be restored on this CPU. CRIU's default, as for a restore: the FPU
    /// state must fit and every instruction set the image has must be here.
    pub fn cpuinfo_check(&self, image: &[u8]) -> Result<(), CriuError> {
        if image.len() > MAX_CPUINFO_BYTES {
            return Err(CriuError::CpuinfoTooLarge {
                len: image.len() as u64,
                max: MAX_CPUINFO_BYTES,
            });
        }
        let dir = tempfile::tempdir().map_err(CriuError::TempDir)?;
        let path = dir.path().join(CPUINFO_IMAGE);
        std::fs::write(&path, image).map_err(|source| CriuError::Write { path, source })?;
        match run(Command::new(&self.binary)
            .args(["cpuinfo", "check", "-D"])
            .arg(dir.path()))
        {
            Ok(_) => Ok(()),
            Err(ToolError::Failed { output, .. }) => Err(CriuError::CpuMismatch { output }),
            Err(e) => Err(e.into()),
        }
    }

    fn has_feature(&self, feature: &str) -> bool {
        run(Command::new(&self.binary).args(["check", "--feature", feature])).is_ok()
    }
}

/// The file `criu cpuinfo dump` writes into its directory.
const CPUINFO_IMAGE: &str = "cpuinfo.img";

/// Smallest `fs.pipe-max-size` with which CRIU's page server works: below it
/// (the default is 1 MiB) a lazy dump fails with `page-pipe: splice: Bad file
/// descriptor` and the restore with `uffd: Failed sending restore finished
/// indication` (measured with CRIU 4.2.1).
pub const MIN_PIPE_MAX_SIZE: u64 = 4 << 20;

const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

/// What [`ensure_pipe_max_size`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeMaxSize {
    Enough(u64),
    Raised { from: u64, to: u64 },
}

/// Raises `fs.pipe-max-size` to [`MIN_PIPE_MAX_SIZE`] when it is lower (needs
/// root); errors when it is lower and cannot be raised.
pub fn ensure_pipe_max_size() -> Result<PipeMaxSize, CriuError> {
    let read = || -> Result<u64, CriuError> {
        let text = std::fs::read_to_string(PIPE_MAX_SIZE).map_err(|source| CriuError::Sysctl {
            what: "reading",
            source,
        })?;
        text.trim().parse().map_err(|_| CriuError::Sysctl {
            what: "parsing",
            source: std::io::Error::other(format!("{PIPE_MAX_SIZE} holds {text:?}")),
        })
    };
    let from = read()?;
    if from >= MIN_PIPE_MAX_SIZE {
        return Ok(PipeMaxSize::Enough(from));
    }
    std::fs::write(PIPE_MAX_SIZE, MIN_PIPE_MAX_SIZE.to_string()).map_err(|source| {
        CriuError::Sysctl {
            what: "raising (CRIU's lazy pages need fs.pipe-max-size >= 4194304; run as root or set it in /etc/sysctl.d)",
            source,
        }
    })?;
    Ok(PipeMaxSize::Raised { from, to: read()? })
}

/// The part of a CRIU log that explains a failure: its `Error` lines (the
/// first ones, where the cause usually is), or when it has none its last
/// `lines` lines; or a note saying why there is no log.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => format!(
            "{}:\n{}",
            path.display(),
            explain(&String::from_utf8_lossy(&bytes), lines)
        ),
        Err(e) => format!("{}: no log ({e})", path.display()),
    }
}

fn explain(log: &str, lines: usize) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error ("))
        .take(lines)
        .collect();
    if !errors.is_empty() {
        return errors.join("\n");
    }
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let v = CriuVersion::parse("Version: 4.2.1\n").unwrap();
        assert_eq!(v.to_string(), "4.2.1");
        let v = CriuVersion::parse("Version: 3.17\nGitID: v3.17\n").unwrap();
        assert_eq!((v.major, v.minor, v.patch), (3, 17, 0));
        assert!(v < MIN_VERSION);
        assert!(CriuVersion::parse("Version: 4.2.1").unwrap() >= MIN_VERSION);
        assert!(CriuVersion::parse("criu: command not found").is_none());
    }

    #[test]
    fn cpuinfo_beyond_the_bound_is_refused_before_criu_runs() {
        let criu = Criu::new("/nonexistent/criu");
        let err = criu
            .cpuinfo_check(&vec![0; MAX_CPUINFO_BYTES + 1])
            .unwrap_err();
        assert!(matches!(err, CriuError::CpuinfoTooLarge { .. }), "{err}");
    }

    #[test]
    fn a_refused_cpuinfo_says_what_criu_said() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("criu");
        std::fs::write(
            &fake,
            "#!/bin/sh\ntest -s \"$4/cpuinfo.img\" || exit 2\n\
             echo 'Error (criu/arch/x86/cpu.c:262): cpu: CPU xfeatures has unsupported bits' >&2\n\
             exit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = Criu::new(&fake).cpuinfo_check(b"image").unwrap_err();
        assert!(matches!(err, CriuError::CpuMismatch { .. }), "{err}");
        assert!(err.to_string().contains("unsupported bits"), "{err}");
    }

    #[test]
    fn log_tail_shows_errors_first_else_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        let text: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, &text).unwrap();
        let tail = log_tail(&log, 3);
        assert!(tail.ends_with("line 38\nline 39\nline 40"), "{tail}");
        assert!(!tail.contains("line 37"));

        let with_errors = format!(
            "{text}(00.09) 1: Error (criu/files-reg.c:2353): Can't open file etc/game.conf\nline 41\n\
             (00.10) Error (criu/cr-restore.c:2331): Restoring FAILED.\n"
        );
        std::fs::write(&log, with_errors).unwrap();
        let tail = log_tail(&log, 3);
        assert!(tail.contains("Can't open file etc/game.conf\n"), "{tail}");
        assert!(tail.ends_with("Restoring FAILED."), "{tail}");
        assert!(!tail.contains("line 41"));
        assert!(log_tail(&dir.path().join("missing.log"), 3).contains("no log"));
    }
}
