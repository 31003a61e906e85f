//! The source's side of a migration as an explicit state machine: the order
//! of its phases, and for each phase what a failure there leaves behind and
//! so what must be done about it ([`Recovery`]).
//!
//! ```text
//! Inspecting → Connecting → Preflight → SendingLayers → PreSending
//! PreSending → PreCopyRound(1) → … → PreCopyRound(n)       (pre-copy, hybrid)
//! PreSending | PreCopyRound(n) → Freezing → SendingCheckpoint → AwaitingRestore
//! AwaitingRestore → Releasing              (the destination holds its copy: the decision)
//! Releasing → Finishing                    (eager restore)
//! Releasing → ReceivingPages → Finishing   (lazy restore)
//! Finishing → Committing → Done
//! ```
//!
//! The one decision point is entering `Releasing`: the destination holds a
//! restored copy that does not run, and the source records, durably, that
//! this copy is the container before it tells the destination to release
//! it. Before that, every failure resumes the source copy and discards the
//! destination's; after it, the source copy never runs again and the
//! destination's is the container.

use super::messages::MemoryMode;
use super::state::{Direction, ProtocolError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    Inspecting,
    Connecting,
    Preflight,
    SendingLayers,
    /// The upper dir crosses while the container runs.
    PreSending,
    /// A pre-dump round (numbered from 1) and its transfer, container running.
    PreCopyRound(u32),
    /// The final (or lazy) dump: the container is frozen from here on.
    Freezing,
    SendingCheckpoint,
    /// The destination restores the container and holds it, not running.
    AwaitingRestore,
    /// The decision is taken: the destination's copy is released.
    Releasing,
    /// Post-copy: the copy runs on the destination; memory follows from here.
    ReceivingPages,
    /// CRIU ends the source copy; runc's record and the work dir go.
    Finishing,
    Committing,
    Done,
}

/// What a failure in a phase means for the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was frozen: the container runs on the source as before; tell
    /// the destination to discard what it received.
    Untouched,
    /// The container is frozen here and the destination cannot run it: tell
    /// the destination to discard its copy, then resume the container here.
    ResumeSource,
    /// The decision is taken and the destination still needs something from
    /// the source (the release, or memory): hold both, and reconnect to go
    /// on; if the link does not come back, the case is in doubt and waits for
    /// an operator (`migrate resolve`).
    Reconnect,
    /// The source copy is gone: the destination's is the container.
    KeepDestination,
}

/// Where the source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceState {
    pub phase: SourcePhase,
    pub mode: MemoryMode,
}

impl SourceState {
    pub fn new(mode: MemoryMode) -> Self {
        Self {
            phase: SourcePhase::Inspecting,
            mode,
        }
    }

    /// Moves to `next`, or refuses a step out of order (a bug in the agent,
    /// reported rather than acted on).
    pub fn advance(&mut self, next: SourcePhase) -> Result<(), ProtocolError> {
        use SourcePhase as P;
        let rounds = matches!(self.mode, MemoryMode::PreCopy | MemoryMode::Hybrid);
        let lazy = self.mode.is_lazy();
        let allowed = match (self.phase, next) {
            (P::Inspecting, P::Connecting)
            | (P::Connecting, P::Preflight)
            | (P::Preflight, P::SendingLayers)
            | (P::SendingLayers, P::PreSending)
            | (P::PreSending, P::Freezing)
            | (P::PreCopyRound(_), P::Freezing)
            | (P::Freezing, P::SendingCheckpoint)
            | (P::SendingCheckpoint, P::AwaitingRestore)
            | (P::AwaitingRestore, P::Releasing)
            | (P::ReceivingPages, P::Finishing)
            | (P::Finishing, P::Committing)
            | (P::Committing, P::Done) => true,
            (P::PreSending, P::PreCopyRound(1)) => rounds,
            (P::PreCopyRound(n), P::PreCopyRound(m)) => rounds && m == n + 1,
            (P::Releasing, P::ReceivingPages) => lazy,
            (P::Releasing, P::Finishing) => !lazy,
            _ => false,
        };
        if !allowed {
            return Err(ProtocolError {
                state: format!("{:?} ({:?})", self.phase, self.mode),
                direction: Direction::Sent,
                message: phase_name(next),
            });
        }
        self.phase = next;
        Ok(())
    }

    /// What a failure now requires.
    pub fn recovery(&self) -> Recovery {
        use SourcePhase as P;
        match self.phase {
            P::Inspecting
            | P::Connecting
            | P::Preflight
            | P::SendingLayers
            | P::PreSending
            | P::PreCopyRound(_) => Recovery::Untouched,
            // The destination's copy, if any, is held and does not run.
            P::Freezing | P::SendingCheckpoint | P::AwaitingRestore => Recovery::ResumeSource,
            P::Releasing | P::ReceivingPages => Recovery::Reconnect,
            P::Finishing | P::Committing | P::Done => Recovery::KeepDestination,
        }
    }

    /// Whether the container is frozen on the source now.
    pub fn frozen(&self) -> bool {
        use SourcePhase as P;
        matches!(
            self.phase,
            P::Freezing
                | P::SendingCheckpoint
                | P::AwaitingRestore
                | P::Releasing
                | P::ReceivingPages
        )
    }

    /// Whether the decision was taken: the source copy must never run again.
    pub fn decided(&self) -> bool {
        use SourcePhase as P;
        matches!(
            self.phase,
            P::Releasing | P::ReceivingPages | P::Finishing | P::Committing | P::Done
        )
    }
}

fn phase_name(phase: SourcePhase) -> &'static str {
    use SourcePhase as P;
    match phase {
        P::Inspecting => "Inspecting",
        P::Connecting => "Connecting",
        P::Preflight => "Preflight",
        P::SendingLayers => "SendingLayers",
        P::PreSending => "PreSending",
        P::PreCopyRound(_) => "PreCopyRound",
        P::Freezing => "Freezing",
        P::SendingCheckpoint => "SendingCheckpoint",
        P::AwaitingRestore => "AwaitingRestore",
        P::Releasing => "Releasing",
        P::ReceivingPages => "ReceivingPages",
        P::Finishing => "Finishing",
        P::Committing => "Committing",
        P::Done => "Done",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::SourcePhase as P;
    use super::*;

    fn walk(mode: MemoryMode, rounds: u32) -> Vec<(SourcePhase, Recovery)> {
        let mut state = SourceState::new(mode);
        let mut path = vec![P::Connecting, P::Preflight, P::SendingLayers, P::PreSending];
        path.extend((1..=rounds).map(P::PreCopyRound));
        path.extend([
            P::Freezing,
            P::SendingCheckpoint,
            P::AwaitingRestore,
            P::Releasing,
        ]);
        if mode.is_lazy() {
            path.push(P::ReceivingPages);
        }
        path.extend([P::Finishing, P::Committing, P::Done]);
        let mut seen = vec![(state.phase, state.recovery())];
        for phase in path {
            state.advance(phase).unwrap();
            seen.push((phase, state.recovery()));
        }
        seen
    }

    #[test]
    fn every_mode_walks_to_done_with_the_recovery_each_phase_needs() {
        for (mode, rounds) in [
            (MemoryMode::StopAndCopy, 0),
            (MemoryMode::PreCopy, 3),
            (MemoryMode::PostCopy, 0),
            (MemoryMode::Hybrid, 2),
        ] {
            for (phase, recovery) in walk(mode, rounds) {
                let expected = match phase {
                    P::Freezing | P::SendingCheckpoint | P::AwaitingRestore => {
                        Recovery::ResumeSource
                    }
                    P::Releasing | P::ReceivingPages => Recovery::Reconnect,
                    P::Finishing | P::Committing | P::Done => Recovery::KeepDestination,
                    _ => Recovery::Untouched,
                };
                assert_eq!(recovery, expected, "{mode:?} {phase:?}");
            }
        }
    }

    #[test]
    fn steps_out_of_order_are_refused() {
        let mut state = SourceState::new(MemoryMode::StopAndCopy);
        for phase in [P::Connecting, P::Preflight, P::SendingLayers, P::PreSending] {
            state.advance(phase).unwrap();
        }
        // No rounds in stop-and-copy, no skipping the dump.
        assert!(state.advance(P::PreCopyRound(1)).is_err());
        assert!(state.advance(P::AwaitingRestore).is_err());
        let mut pre = SourceState {
            phase: P::PreCopyRound(2),
            mode: MemoryMode::PreCopy,
        };
        assert!(pre.advance(P::PreCopyRound(4)).is_err());
        pre.advance(P::PreCopyRound(3)).unwrap();
        // Nothing is released before the restore, nor finished before the
        // release.
        let mut waiting = SourceState {
            phase: P::AwaitingRestore,
            mode: MemoryMode::PreCopy,
        };
        assert!(waiting.advance(P::Finishing).is_err());
        // Pages only follow a lazy restore.
        let mut eager = SourceState {
            phase: P::Releasing,
            mode: MemoryMode::PreCopy,
        };
        assert!(eager.advance(P::ReceivingPages).is_err());
        let mut lazy = SourceState {
            phase: P::Releasing,
            mode: MemoryMode::PostCopy,
        };
        let err = lazy.advance(P::Finishing).unwrap_err();
        assert!(err.to_string().contains("Releasing"), "{err}");
    }

    #[test]
    fn frozen_only_between_the_dump_and_the_end_of_the_source_copy() {
        let frozen: Vec<_> = walk(MemoryMode::PostCopy, 0)
            .into_iter()
            .filter(|(phase, _)| {
                SourceState {
                    phase: *phase,
                    mode: MemoryMode::PostCopy,
                }
                .frozen()
            })
            .map(|(phase, _)| phase)
            .collect();
        assert_eq!(
            frozen,
            [
                P::Freezing,
                P::SendingCheckpoint,
                P::AwaitingRestore,
                P::Releasing,
                P::ReceivingPages
            ]
        );
    }

    #[test]
    fn the_decision_is_entering_releasing() {
        for (phase, recovery) in walk(MemoryMode::StopAndCopy, 0) {
            let state = SourceState {
                phase,
                mode: MemoryMode::StopAndCopy,
            };
            // Before the decision the source copy can always come back.
            assert_eq!(
                !state.decided(),
                matches!(recovery, Recovery::Untouched | Recovery::ResumeSource),
                "{phase:?}"
            );
        }
    }
}
