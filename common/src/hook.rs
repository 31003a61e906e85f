//! The post-dump gate: how the source keeps a checkpointed container frozen,
//! not killed, until the destination has restored it.
//!
//! CRIU runs an action script at each step of a dump ([`crate::criu`] names
//! ours in the per-checkpoint config). The script execs `migrate
//! criu-action-hook SOCKET`, which reports the action over a unix socket to
//! the source agent. For `post-dump` (images complete, processes still
//! frozen) it then blocks until the agent answers: `finish` exits 0 and CRIU
//! goes on to kill the frozen processes; anything else (`resume`, a closed
//! socket because the agent died, a refused connection) exits non-zero, and
//! CRIU resumes the processes as if nothing happened. So the container can
//! only disappear from the source after the agent said so.
//!
//! CRIU may run the script more than once per action; every answer for an
//! action is the same, so repeats are harmless.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

pub const ACTION_ENV: &str = "CRTOOLS_SCRIPT_ACTION";
const POST_DUMP: &str = "post-dump";

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("binding the CRIU action socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the CRIU action script {path}")]
    Script {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What CRIU should do with the frozen container once post-dump is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The destination runs the container: let CRIU kill the source copy.
    Finish,
    /// Anything went wrong: CRIU resumes the processes on the source.
    Resume,
}

/// One action CRIU reported, and when.
#[derive(Debug, Clone)]
pub struct ActionEvent {
    pub action: String,
    pub at: Instant,
}

/// The source agent's end of the gate.
#[derive(Debug)]
pub struct PostDumpGate {
    events: mpsc::UnboundedReceiver<ActionEvent>,
    verdict: watch::Sender<Option<Verdict>>,
}

impl PostDumpGate {
    /// Listens on `socket` (which must not exist yet).
    pub fn bind(socket: &Path) -> Result<Self, HookError> {
        let listener = UnixListener::bind(socket).map_err(|source| HookError::Bind {
            path: socket.to_owned(),
            source,
        })?;
        let (event_tx, events) = mpsc::unbounded_channel();
        let (verdict, verdict_rx) = watch::channel(None);
        tokio::spawn(serve(listener, event_tx, verdict_rx));
        Ok(Self { events, verdict })
    }

    /// The next action CRIU reported; `None` once the gate is closed.
    pub async fn next_event(&mut self) -> Option<ActionEvent> {
        self.events.recv().await
    }

    /// Answers every pending and future post-dump query with `verdict`.
    pub fn decide(&self, verdict: Verdict) {
        self.verdict.send_replace(Some(verdict));
    }
}

async fn serve(
    listener: UnixListener,
    events: mpsc::UnboundedSender<ActionEvent>,
    verdict: watch::Receiver<Option<Verdict>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        if events.is_closed() {
            return;
        }
        let events = events.clone();
        let mut verdict = verdict.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if AsyncBufReader::new(read)
                .read_line(&mut line)
                .await
                .is_err()
            {
                return;
            }
            let action = line.trim().to_owned();
            let _ = events.send(ActionEvent {
                action: action.clone(),
                at: Instant::now(),
            });
            let answer = if action == POST_DUMP {
                // A dropped gate (agent failing) also ends the wait, as Resume.
                match verdict.wait_for(Option::is_some).await {
                    Ok(v) if *v == Some(Verdict::Finish) => "finish\n",
                    _ => "resume\n",
                }
            } else {
                "ok\n"
            };
            let _ = write.write_all(answer.as_bytes()).await;
        });
    }
}

/// The hook's side, run by `migrate criu-action-hook SOCKET` inside CRIU's
/// action script. Returns the exit code for CRIU.
pub fn run_action_hook(socket: &Path, action: &str) -> i32 {
    let is_post_dump = action == POST_DUMP;
    let answer = StdUnixStream::connect(socket).and_then(|mut stream| {
        stream.write_all(format!("{action}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    });
    match answer {
        Ok(line) if line.trim() == "finish" || (!is_post_dump && line.trim() == "ok") => 0,
        // Reporting other actions is best effort; never fail a dump for it.
        _ if !is_post_dump => 0,
        _ => 1,
    }
}

/// The shell script CRIU runs (its config's `action-script` takes a path,
/// not a command line).
/// Only the actions the agent waits for or times are reported: CRIU runs
/// the script for every action, some while the container is frozen, and
/// each report is a process start.
pub fn action_script(migrate_exe: &Path, socket: &Path) -> String {
    format!(
        "#!/bin/sh\n# Written by migrate for one checkpoint: see migrate-common's hook module.\n\
         case \"${ACTION_ENV}\" in\n  {REPORTED_ACTIONS}) ;;\n  *) exit 0 ;;\nesac\n\
         exec {} criu-action-hook {}\n",
        shell_quote(&migrate_exe.to_string_lossy()),
        shell_quote(&socket.to_string_lossy())
    )
}

/// The actions [`action_script`] reports, in `case` pattern syntax.
const REPORTED_ACTIONS: &str = "pre-dump|post-dump|status-ready";

pub fn write_action_script(
    path: &Path,
    migrate_exe: &Path,
    socket: &Path,
) -> Result<(), HookError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| HookError::Script {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(path)
        .map_err(err)?;
    file.write_all(action_script(migrate_exe, socket).as_bytes())
        .map_err(err)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn script_quotes_paths() {
        let s = action_script(Path::new("/opt/it's/migrate"), Path::new("/run/m/h.sock"));
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(
            s.contains("case \"$CRTOOLS_SCRIPT_ACTION\" in\n  pre-dump|post-dump|status-ready) ;;"),
            "{s}"
        );
        assert!(
            s.ends_with("exec '/opt/it'\\''s/migrate' criu-action-hook '/run/m/h.sock'\n"),
            "{s}"
        );
    }

    async fn hook(socket: PathBuf, action: &'static str) -> i32 {
        tokio::task::spawn_blocking(move || run_action_hook(&socket, action))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn post_dump_blocks_until_finish() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("hook.sock");
        let mut gate = PostDumpGate::bind(&socket).unwrap();
        assert_eq!(hook(socket.clone(), "pre-dump").await, 0);
        assert_eq!(gate.next_event().await.unwrap().action, "pre-dump");

        let pending = tokio::spawn(hook(socket.clone(), "post-dump"));
        assert_eq!(gate.next_event().await.unwrap().action, "post-dump");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !pending.is_finished(),
            "post-dump must wait for the verdict"
        );
        gate.decide(Verdict::Finish);
        assert_eq!(pending.await.unwrap(), 0);
        // A repeated post-dump gets the same answer at once.
        assert_eq!(hook(socket, "post-dump").await, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn resume_verdict_fails_post_dump() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("hook.sock");
        let gate = PostDumpGate::bind(&socket).unwrap();
        gate.decide(Verdict::Resume);
        assert_eq!(hook(socket, "post-dump").await, 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dropped_gate_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("hook.sock");
        let mut gate = PostDumpGate::bind(&socket).unwrap();
        let pending = tokio::spawn(hook(socket.clone(), "post-dump"));
        gate.next_event().await.unwrap();
        drop(gate);
        assert_eq!(pending.await.unwrap(), 1);
    }

    #[test]
    fn unreachable_agent_resumes_post_dump_only() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nobody.sock");
        assert_eq!(run_action_hook(&socket, "post-dump"), 1);
        assert_eq!(run_action_hook(&socket, "network-lock"), 0);
    }
}
