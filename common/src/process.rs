//! Running an external tool and turning its failure into an error that shows
//! what ran, how it ended and what it printed.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

/// How much of a tool's output an error message keeps.
const OUTPUT_TAIL_BYTES: usize = 4000;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {program}: is it installed? (scripts/setup.sh installs it)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        output: String,
    },
}

/// Runs `cmd` to completion; returns its stdout, or an error carrying its
/// status and the tail of its stdout and stderr.
pub fn run(cmd: &mut Command) -> Result<String, ToolError> {
    let out = cmd.output().map_err(|source| ToolError::Spawn {
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    check(cmd, out)
}

/// Turns a finished process's output into the same result as [`run`].
pub fn check(cmd: &Command, out: Output) -> Result<String, ToolError> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(ToolError::Failed {
        command: describe(cmd),
        status: out.status,
        output: tail(&format!("{stdout}{stderr}"), OUTPUT_TAIL_BYTES),
    })
}

/// Descriptors a child inherits at fixed numbers: CRIU is told the number
/// (`ps-socket N`), and runc passes descriptors it inherited on to `criu swrk`
/// untouched, except the low ones it uses itself (3 is CRIU's RPC socket), so
/// the numbers are high.
#[derive(Debug, Default)]
pub struct InheritedFds {
    fds: Vec<(OwnedFd, RawFd)>,
}

impl InheritedFds {
    pub fn add(&mut self, fd: OwnedFd, number: RawFd) {
        self.fds.push((fd, number));
    }

    /// Arranges for `cmd`'s child to have each descriptor at its number. The
    /// descriptors stay open here (the caller keeps `self` until the child
    /// runs) and close-on-exec in this process.
    pub fn apply(&self, cmd: &mut Command) {
        let pairs: Vec<(RawFd, RawFd)> = self
            .fds
            .iter()
            .map(|(fd, number)| (fd.as_raw_fd(), *number))
            .collect();
        let above = pairs.iter().map(|(_, n)| *n).max().unwrap_or(0) + 1;
        // SAFETY: between fork and exec the closure calls only fcntl and
        // dup2, which are async-signal-safe, and allocates nothing: `pairs`
        // was built before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // Moved above every target first, so that no dup2 below
                // overwrites a descriptor still to be moved.
                let mut moved = [(-1, -1); 8];
                if pairs.len() > moved.len() {
                    return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
                }
                for (slot, (fd, number)) in moved.iter_mut().zip(&pairs) {
                    let high = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above);
                    if high < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    *slot = (high, *number);
                }
                for (high, number) in &moved[..pairs.len()] {
                    // dup2 clears close-on-exec on the new descriptor.
                    if libc::dup2(*high, *number) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

/// Waits up to `bound` for process `pid` to end (exited, zombie or
/// reaped); `false` if it still runs then. Through a pidfd, which becomes
/// readable when the process ends: no polling, no confusion with a later
/// process of the same pid once it is open.
pub async fn wait_for_exit(pid: i32, bound: std::time::Duration) -> std::io::Result<bool> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Ok(true),
            _ => Err(err),
        };
    }
    let fd = RawFd::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the descriptor was just returned to us and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the OwnedFd moves into the AsyncFd and stays open, the same
    // descriptor, until the AsyncFd drops it.
    let pidfd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
    }?;
    match tokio::time::timeout(bound, pidfd.readable()).await {
        Ok(ready) => ready.map(|_| true),
        Err(_) => Ok(false),
    }
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(text: &str, max: usize) -> String {
    let text = text.trim_end();
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_status_and_output() {
        let err =
            run(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("out") && msg.contains("err"), "{msg}");
        assert!(msg.contains("sh -c"), "{msg}");
    }

    #[test]
    fn missing_program_says_so() {
        let err = run(&mut Command::new("/nonexistent/tool")).unwrap_err();
        assert!(matches!(err, ToolError::Spawn { .. }));
    }

    #[test]
    fn child_inherits_descriptors_at_their_numbers() {
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (_, second) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut fds = InheritedFds::default();
        fds.add(theirs.into(), 100);
        fds.add(second.into(), 101);
        // bash: dash redirects single-digit descriptors only.
        let mut cmd = Command::new("bash");
        cmd.args(["-c", "echo hello >&100 && test -e /proc/self/fd/101"]);
        fds.apply(&mut cmd);
        let status = cmd.status().unwrap();
        drop(fds);
        assert!(status.success());
        let mut got = String::new();
        use std::io::Read;
        ours.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello\n");
    }

    #[tokio::test]
    async fn exit_is_seen_through_the_pidfd_and_a_live_process_times_out() {
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = i32::try_from(sleeper.id()).unwrap();
        let short = std::time::Duration::from_millis(100);
        assert!(!wait_for_exit(pid, short).await.unwrap());
        sleeper.kill().unwrap();
        // Not reaped yet: a zombie has ended too.
        assert!(wait_for_exit(pid, std::time::Duration::from_secs(5))
            .await
            .unwrap());
        sleeper.wait().unwrap();
        assert!(wait_for_exit(pid, short).await.unwrap());
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("abcdef", 3), "…def");
        assert_eq!(tail("abc\n", 10), "abc");
    }
}
