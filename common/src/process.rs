//! Running an external tool and turning its failure into an error that shows
//! what ran, how it ended and what it printed.

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
    fn tail_keeps_the_end() {
        assert_eq!(tail("abcdef", 3), "…def");
        assert_eq!(tail("abc\n", 10), "abc");
    }
}
