//! `<state-dir>/drain.pid`: one drain at a time per state dir, and how
//! `migrate cancel --drain` finds the drain to signal.
//!
//! The file is flock'ed for as long as the drain runs: a second drain, or a
//! cancel, tells a live drain from a file a killed one left behind by
//! trying the lock, never by the pid alone (which may have been reused).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub const PID_FILE: &str = "drain.pid";

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error(
        "another drain (pid {pid}) is running on {state_dir}: `migrate cancel --drain` stops it"
    )]
    Busy { pid: String, state_dir: PathBuf },
    #[error("no drain is running on {0}")]
    NotRunning(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} names pid {pid:?}, not a process id")]
    BadPid { path: PathBuf, pid: String },
    #[error("signalling the drain (pid {pid}): {source}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
}

/// The running drain's claim on its state dir; removed when dropped.
#[derive(Debug)]
pub struct DrainPid {
    path: PathBuf,
    _lock: Flock<File>,
}

impl DrainPid {
    pub fn claim(state_dir: &Path) -> Result<Self, PidFileError> {
        let path = state_dir.join(PID_FILE);
        let io = |source| PidFileError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        loop {
            let file = open(&path).map_err(io)?;
            let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((mut file, _)) => {
                    return Err(PidFileError::Busy {
                        pid: read_pid(&mut file),
                        state_dir: state_dir.to_owned(),
                    })
                }
            };
            // A drain that ended between our open and our lock removed the
            // file we hold: lock the one at the path now.
            if !same_file(&lock, &path) {
                continue;
            }
            lock.set_len(0).map_err(io)?;
            lock.rewind().map_err(io)?;
            writeln!(lock, "{}", std::process::id()).map_err(io)?;
            return Ok(Self { path, _lock: lock });
        }
    }
}

impl Drop for DrainPid {
    fn drop(&mut self) {
        // Removed while still locked, so that no other drain takes it first.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `signal` to the drain running on `state_dir`; returns its pid.
pub fn signal_drain(
    state_dir: &Path,
    signal: nix::sys::signal::Signal,
) -> Result<i32, PidFileError> {
    let path = state_dir.join(PID_FILE);
    let not_running = || PidFileError::NotRunning(state_dir.to_owned());
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_running()),
        Err(source) => return Err(PidFileError::Io { path, source }),
    };
    let mut file = match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Nobody holds it: what is left of a drain that was killed.
        Ok(_) => return Err(not_running()),
        Err((file, _)) => file,
    };
    let text = read_pid(&mut file);
    let pid: i32 = text.parse().map_err(|_| PidFileError::BadPid {
        path: path.clone(),
        pid: text.clone(),
    })?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .map_err(|source| PidFileError::Signal { pid, source })?;
    Ok(pid)
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

fn read_pid(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind().and_then(|()| file.read_to_string(&mut text));
    text.trim().to_owned()
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_drain_per_state_dir_and_the_file_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = DrainPid::claim(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(PID_FILE)).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        let second = DrainPid::claim(dir.path()).unwrap_err();
        assert!(matches!(second, PidFileError::Busy { .. }), "{second}");
        drop(first);
        assert!(!dir.path().join(PID_FILE).exists());
        DrainPid::claim(dir.path()).unwrap();
    }

    #[test]
    fn a_file_left_by_a_killed_drain_is_no_drain() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PID_FILE), "1\n").unwrap();
        let e = signal_drain(dir.path(), nix::sys::signal::Signal::SIGUSR1).unwrap_err();
        assert!(matches!(e, PidFileError::NotRunning(_)), "{e}");
        // And a new drain takes it over.
        DrainPid::claim(dir.path()).unwrap();
    }

    #[test]
    fn no_file_no_drain() {
        let dir = tempfile::tempdir().unwrap();
        let e = signal_drain(dir.path(), nix::sys::signal::Signal::SIGUSR1).unwrap_err();
        assert!(matches!(e, PidFileError::NotRunning(_)), "{e}");
    }
}
