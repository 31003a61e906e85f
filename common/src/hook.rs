//! Gates on CRIU's action script: how a container is held, frozen, while
//! the migration's outcome is not known yet, on either side.
//!
//! CRIU runs an action script at each step of a dump or restore (the
//! per-migration CRIU config names ours). The script execs the agent's
//! binary as `criu-action-hook SOCKET`, which reports the action over a unix
//! socket to the agent and, for the one action it is held at, blocks until
//! the agent answers:
//!
//! - **source, `post-dump`** (images complete, processes frozen): `proceed`
//!   exits 0 and CRIU ends the frozen processes; `undo` exits non-zero and
//!   CRIU resumes them as if nothing happened.
//! - **destination, `post-restore`** (processes restored, not yet resumed):
//!   `proceed` exits 0 and CRIU lets them run; `undo` exits non-zero and CRIU
//!   kills them. A non-zero exit there fails closed; CRIU 4.2 ignores the
//!   exit status of `pre-resume`, which is why the hold is at `post-restore`.
//!
//! When the agent is gone (it crashed, or was killed) the hook does not
//! guess: on the source it reads the migration's durable record
//! ([`crate::record`]) and ends the source copy only if the record says the
//! decision was taken; on the destination it waits for a restarted agent,
//! which finds the held container from its own record and answers in its
//! place. So a container disappears from the source only after the source
//! decided, and runs on the destination only after it said so.
//!
//! CRIU may run the script more than once per action; every answer for an
//! action is the same, so repeats are harmless.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use crate::record::{self, SourcePhase, SourceRecord};

pub const ACTION_ENV: &str = "CRTOOLS_SCRIPT_ACTION";
/// The source's hold: images complete, processes frozen.
pub const POST_DUMP: &str = "post-dump";
/// The destination's hold: processes restored, not yet resumed.
pub const POST_RESTORE: &str = "post-restore";
/// How often a destination hook whose agent is gone tries again.
const AGENT_RETRY: Duration = Duration::from_millis(500);

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

/// What CRIU should do with the container held at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on: the source ends its copy; the destination lets its copy run.
    Proceed,
    /// Go back: the source resumes its copy; the destination kills its copy.
    Undo,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Proceed => "proceed",
            Verdict::Undo => "undo",
        }
    }
}

/// One action CRIU reported, and when.
#[derive(Debug, Clone)]
pub struct ActionEvent {
    pub action: String,
    pub at: Instant,
}

/// The agent's end of a gate.
#[derive(Debug)]
pub struct Gate {
    events: mpsc::UnboundedReceiver<ActionEvent>,
    verdict: watch::Sender<Option<Verdict>>,
}

impl Gate {
    /// Listens on `socket` (which must not exist yet); `held` is the action
    /// that waits for [`Gate::decide`].
    pub fn bind(socket: &Path, held: &'static str) -> Result<Self, HookError> {
        let listener = UnixListener::bind(socket).map_err(|source| HookError::Bind {
            path: socket.to_owned(),
            source,
        })?;
        let (event_tx, events) = mpsc::unbounded_channel();
        let (verdict, verdict_rx) = watch::channel(None);
        tokio::spawn(serve(listener, held, event_tx, verdict_rx));
        Ok(Self { events, verdict })
    }

    /// The next action CRIU reported; `None` once the gate is closed.
    pub async fn next_event(&mut self) -> Option<ActionEvent> {
        self.events.recv().await
    }

    /// Answers every pending and future query of the held action with
    /// `verdict`.
    pub fn decide(&self, verdict: Verdict) {
        self.verdict.send_replace(Some(verdict));
    }
}

async fn serve(
    listener: UnixListener,
    held: &'static str,
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
            let answer = if action == held {
                // A dropped gate (agent ending) closes the connection
                // unanswered: the hook then does what its side does
                // without an agent.
                match verdict.wait_for(Option::is_some).await {
                    Ok(v) => v.map(Verdict::word).unwrap_or_default(),
                    Err(_) => return,
                }
            } else {
                "ok"
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

/// What a hook does about the held action when the agent is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentGone {
    /// Source: decide from the migration's durable record.
    ConsultRecord(PathBuf),
    /// Destination: wait for a restarted agent to answer.
    WaitForAgent,
}

/// The hook's side, run by `criu-action-hook SOCKET` inside CRIU's action
/// script. `held` is the action it holds at. Returns the exit code for CRIU.
pub fn run_action_hook(socket: &Path, action: &str, held: &str, gone: &AgentGone) -> i32 {
    if action != held {
        // Reporting other actions is best effort; never fail CRIU for it.
        let _ = ask(socket, action);
        return 0;
    }
    loop {
        match ask(socket, action) {
            Some(answer) if answer == Verdict::Proceed.word() => return 0,
            Some(answer) if answer == Verdict::Undo.word() => return 1,
            _ => {}
        }
        match gone {
            AgentGone::ConsultRecord(path) => return decide_from_record(path),
            AgentGone::WaitForAgent => std::thread::sleep(AGENT_RETRY),
        }
    }
}

/// The answer to `action`, or `None` when no agent answered.
fn ask(socket: &Path, action: &str) -> Option<String> {
    let mut stream = StdUnixStream::connect(socket).ok()?;
    stream.write_all(format!("{action}\n").as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let answer = line.trim();
    (!answer.is_empty()).then(|| answer.to_owned())
}

/// Without an agent, the source copy ends only if the record says the
/// destination's copy was chosen; anything else (no record, an unreadable
/// one, no decision) resumes it.
fn decide_from_record(path: &Path) -> i32 {
    match record::load::<SourceRecord>(path) {
        Ok(Some(rec)) if matches!(rec.phase, SourcePhase::Decided | SourcePhase::Done) => 0,
        _ => 1,
    }
}

/// The shell script CRIU runs (its config's `action-script` takes a path,
/// not a command line). Only `reported` actions reach the agent: CRIU runs
/// the script for every action, some while the container is frozen, and
/// each report is a process start. `extra` are more arguments for the hook.
pub fn action_script(exe: &Path, socket: &Path, reported: &str, extra: &[&Path]) -> String {
    let mut args = vec![
        shell_quote(&exe.to_string_lossy()),
        "criu-action-hook".to_owned(),
        shell_quote(&socket.to_string_lossy()),
    ];
    for path in extra {
        args.push("--record".to_owned());
        args.push(shell_quote(&path.to_string_lossy()));
    }
    format!(
        "#!/bin/sh\n# Written by migrate for one migration: see migrate-common's hook module.\n\
         case \"${ACTION_ENV}\" in\n  {reported}) ;;\n  *) exit 0 ;;\nesac\n\
         exec {}\n",
        args.join(" ")
    )
}

/// The actions the source's dumps report, in `case` pattern syntax.
pub const SOURCE_ACTIONS: &str = "pre-dump|post-dump|status-ready";
/// The actions the destination's restores report.
pub const DESTINATION_ACTIONS: &str = "post-restore";

/// Writes `script` (mode 0700, must not exist yet).
pub fn write_action_script(path: &Path, script: &str) -> Result<(), HookError> {
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
    file.write_all(script.as_bytes()).map_err(err)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
