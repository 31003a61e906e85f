//! Which way memory moves: the user's `--mode`, checked against what this
//! host can do, with the one-line reason the summary shows.
//!
//! `auto` picks pre-copy where this host tracks dirty memory (the
//! destination restores a pre-dump chain like any other dump) and
//! stop-and-copy otherwise. It never picks post-copy or hybrid: once the copy
//! runs on the destination, a failure of the destination or of the link while
//! memory is still on the source leaves no good way back, so that risk is the
//! user's explicit choice. The destination refuses a lazy mode in preflight
//! when it cannot restore lazily.

use migrate_common::protocol::MemoryMode;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestedMode {
    Auto,
    StopAndCopy,
    PreCopy,
    PostCopy,
    Hybrid,
}

/// What this host offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceCapabilities {
    /// `criu check --feature mem_dirty_track` passed.
    pub dirty_tracking: bool,
    /// Why CRIU's lazy page server cannot work here, if it cannot.
    pub lazy_problem: Option<String>,
}

/// The mode a migration uses and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeChoice {
    pub mode: MemoryMode,
    pub reason: String,
}

const NO_DIRTY_TRACKING: &str =
    "this host's kernel has no soft-dirty memory tracking (criu check --feature mem_dirty_track fails)";

pub fn choose(requested: RequestedMode, caps: &SourceCapabilities) -> Result<ModeChoice, String> {
    let choice = |mode, reason: &str| {
        Ok(ModeChoice {
            mode,
            reason: reason.to_owned(),
        })
    };
    let lazy_ok = || match &caps.lazy_problem {
        None => Ok(()),
        Some(problem) => Err(format!("post-copy is unavailable: {problem}")),
    };
    match requested {
        RequestedMode::Auto if caps.dirty_tracking => {
            choice(MemoryMode::PreCopy, "auto: pre-copy, this host tracks dirty memory")
        }
        RequestedMode::Auto => choice(
            MemoryMode::StopAndCopy,
            &format!(
                "auto: stop-and-copy, because {NO_DIRTY_TRACKING}; post-copy is never chosen automatically"
            ),
        ),
        RequestedMode::StopAndCopy => choice(MemoryMode::StopAndCopy, "requested"),
        RequestedMode::PreCopy if caps.dirty_tracking => choice(MemoryMode::PreCopy, "requested"),
        RequestedMode::PreCopy => Err(format!("pre-copy is unavailable: {NO_DIRTY_TRACKING}")),
        RequestedMode::PostCopy => {
            lazy_ok()?;
            choice(MemoryMode::PostCopy, "requested")
        }
        RequestedMode::Hybrid if !caps.dirty_tracking => {
            Err(format!("hybrid is unavailable: {NO_DIRTY_TRACKING}"))
        }
        RequestedMode::Hybrid => {
            lazy_ok().map_err(|e| e.replacen("post-copy", "hybrid", 1))?;
            choice(MemoryMode::Hybrid, "requested")
        }
    }
}

/// The name the CLI and the summary use.
pub fn name(mode: MemoryMode) -> &'static str {
    match mode {
        MemoryMode::StopAndCopy => "stop-and-copy",
        MemoryMode::PreCopy => "pre-copy",
        MemoryMode::PostCopy => "post-copy",
        MemoryMode::Hybrid => "hybrid",
        MemoryMode::Invalid => "invalid",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn caps(dirty: bool, lazy: bool) -> SourceCapabilities {
        SourceCapabilities {
            dirty_tracking: dirty,
            lazy_problem: (!lazy).then(|| "fs.pipe-max-size is 1 MiB".to_owned()),
        }
    }

    #[test]
    fn auto_prefers_pre_copy_and_never_picks_post_copy() {
        let c = choose(RequestedMode::Auto, &caps(true, true)).unwrap();
        assert_eq!(c.mode, MemoryMode::PreCopy);
        let c = choose(RequestedMode::Auto, &caps(false, true)).unwrap();
        assert_eq!(c.mode, MemoryMode::StopAndCopy);
        assert!(c.reason.contains("soft-dirty"), "{}", c.reason);
        assert!(!c.reason.contains('\n'), "one line: {}", c.reason);
    }

    #[test]
    fn explicit_modes_need_what_they_use() {
        assert!(choose(RequestedMode::PreCopy, &caps(false, true))
            .unwrap_err()
            .contains("pre-copy is unavailable"));
        assert!(choose(RequestedMode::PostCopy, &caps(true, false))
            .unwrap_err()
            .contains("pipe-max-size"));
        assert!(choose(RequestedMode::Hybrid, &caps(false, true))
            .unwrap_err()
            .contains("hybrid is unavailable"));
        assert!(choose(RequestedMode::Hybrid, &caps(true, false))
            .unwrap_err()
            .starts_with("hybrid is unavailable"));
        assert_eq!(
            choose(RequestedMode::PostCopy, &caps(false, true))
                .unwrap()
                .mode,
            MemoryMode::PostCopy
        );
        assert_eq!(
            choose(RequestedMode::StopAndCopy, &caps(true, true))
                .unwrap()
                .mode,
            MemoryMode::StopAndCopy
        );
    }
}
