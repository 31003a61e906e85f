//! The destination's side of the exchange as an explicit state machine (the
//! source's is in [`super::source`]).
//!
//! ```text
//! AwaitingHello ─Hello▸ Preflighting ─PreflightReply(accepted)▸ ReceivingLayers
//!                            └─PreflightReply(refused)▸ Refused
//! ReceivingLayers ─LayersSent▸ VerifyingLayers ─LayersReady▸ PreCopying
//! PreCopying ─RoundSent▸ PreCopying                     (one per pre-dump round)
//! PreCopying ─CheckpointSent{lazy}▸ Restoring{lazy}
//! Restoring{eager} ─Restored▸ AwaitingCommit
//! Restoring{lazy}  ─Restored▸ ReceivingPages ─PagesComplete▸ AwaitingCommit
//! AwaitingCommit ─Commit▸ Committing ─Committed▸ Completed
//! any non-final state ─Abort (either way)▸ Aborted;  ─Failed (sent)▸ Failed
//! ```
//!
//! `▸` after a received message name means the source sent it, after a reply
//! name that the destination sent it. A message that does not fit the current
//! state is a [`ProtocolError`] naming both; the daemon then aborts. A lost
//! connection is not a transition: from `Restoring{lazy}` on, the session
//! waits for the source to come back with [`super::Resume`] and goes on in the
//! state it was in.

use super::messages::{Body, ControlMessage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationState {
    AwaitingHello,
    Preflighting,
    ReceivingLayers,
    VerifyingLayers,
    PreCopying,
    Restoring { lazy: bool },
    ReceivingPages,
    AwaitingCommit,
    Committing,
    Completed,
    Refused,
    Failed,
    Aborted,
}

/// Which way a message travelled, seen from the side that keeps the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Received,
    Sent,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("protocol violation: {direction:?} {message} while {state}")]
pub struct ProtocolError {
    pub state: String,
    pub direction: Direction,
    pub message: &'static str,
}

impl DestinationState {
    /// No message moves a final state anywhere.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Refused | Self::Failed | Self::Aborted
        )
    }

    /// Whether the destination holds a restored container that the source has
    /// not yet given up: its copy must be kept if the link is lost, because
    /// the source may already have let its own copy go.
    pub fn holds_restored_container(self) -> bool {
        matches!(
            self,
            Self::ReceivingPages | Self::AwaitingCommit | Self::Committing | Self::Completed
        )
    }

    /// Whether a lost connection is waited out rather than given up: in a
    /// lazy restore the copy may already run while its memory is still on
    /// the source. (Once every page has arrived the copy needs nothing more
    /// from the source, and is kept whatever happens to the link.)
    pub fn waits_for_resume(self) -> bool {
        matches!(self, Self::Restoring { lazy: true } | Self::ReceivingPages)
    }

    /// The state after `msg` travelled in `direction`.
    pub fn next(
        self,
        direction: Direction,
        msg: &ControlMessage,
    ) -> Result<DestinationState, ProtocolError> {
        use DestinationState as S;
        use Direction::{Received, Sent};
        let next = match (self, direction, &msg.body) {
            (s, _, Some(Body::Abort(_))) if !s.is_final() => Some(S::Aborted),
            (s, Sent, Some(Body::Failed(_))) if !s.is_final() => Some(S::Failed),
            (S::AwaitingHello, Received, Some(Body::Hello(_))) => Some(S::Preflighting),
            (S::Preflighting, Sent, Some(Body::PreflightReply(reply))) => Some(if reply.accepted {
                S::ReceivingLayers
            } else {
                S::Refused
            }),
            (S::ReceivingLayers, Received, Some(Body::LayersSent(_))) => Some(S::VerifyingLayers),
            (S::VerifyingLayers, Sent, Some(Body::LayersReady(_))) => Some(S::PreCopying),
            (S::PreCopying, Received, Some(Body::RoundSent(_))) => Some(S::PreCopying),
            (S::PreCopying, Received, Some(Body::CheckpointSent(sent))) => {
                Some(S::Restoring { lazy: sent.lazy })
            }
            (S::Restoring { lazy: false }, Sent, Some(Body::Restored(_))) => {
                Some(S::AwaitingCommit)
            }
            (S::Restoring { lazy: true }, Sent, Some(Body::Restored(_))) => Some(S::ReceivingPages),
            (S::ReceivingPages, Sent, Some(Body::PagesComplete(_))) => Some(S::AwaitingCommit),
            (S::AwaitingCommit, Received, Some(Body::Commit(_))) => Some(S::Committing),
            (S::Committing, Sent, Some(Body::Committed(_))) => Some(S::Completed),
            _ => None,
        };
        next.ok_or(ProtocolError {
            state: format!("{self:?}"),
            direction,
            message: msg.kind(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Direction::{Received, Sent};
    use super::*;
    use crate::protocol::messages::*;

    fn path(lazy: bool, rounds: usize) -> Vec<(Direction, ControlMessage)> {
        let mut steps = vec![
            (Received, Hello::default().into()),
            (
                Sent,
                PreflightReply {
                    accepted: true,
                    ..Default::default()
                }
                .into(),
            ),
            (Received, LayersSent::default().into()),
            (Sent, LayersReady {}.into()),
        ];
        for round in 1..=rounds {
            steps.push((
                Received,
                RoundSent {
                    round: round as u32,
                    files: vec![],
                }
                .into(),
            ));
        }
        steps.push((
            Received,
            CheckpointSent {
                lazy,
                ..Default::default()
            }
            .into(),
        ));
        steps.push((Sent, Restored::default().into()));
        if lazy {
            steps.push((Sent, PagesComplete::default().into()));
        }
        steps.push((Received, Commit {}.into()));
        steps.push((Sent, Committed {}.into()));
        steps
    }

    fn walk(steps: &[(Direction, ControlMessage)]) -> Vec<DestinationState> {
        let mut state = DestinationState::AwaitingHello;
        let mut seen = vec![state];
        for (dir, msg) in steps {
            state = state.next(*dir, msg).unwrap();
            seen.push(state);
        }
        seen
    }

    #[test]
    fn every_mode_completes() {
        for (lazy, rounds) in [(false, 0), (false, 3), (true, 0), (true, 2)] {
            let states = walk(&path(lazy, rounds));
            assert_eq!(states.last(), Some(&DestinationState::Completed));
            assert_eq!(
                states.contains(&DestinationState::ReceivingPages),
                lazy,
                "lazy={lazy}"
            );
        }
    }

    #[test]
    fn refusal_is_final() {
        let state = DestinationState::AwaitingHello
            .next(Received, &Hello::default().into())
            .unwrap()
            .next(Sent, &PreflightReply::default().into())
            .unwrap();
        assert_eq!(state, DestinationState::Refused);
        let err = state
            .next(Received, &LayersSent::default().into())
            .unwrap_err();
        assert_eq!(err.state, "Refused");
        assert_eq!(err.message, "LayersSent");
    }

    #[test]
    fn out_of_order_messages_name_state_and_message() {
        let err = DestinationState::AwaitingHello
            .next(Received, &CheckpointSent::default().into())
            .unwrap_err();
        assert_eq!(
            err,
            ProtocolError {
                state: "AwaitingHello".into(),
                direction: Received,
                message: "CheckpointSent",
            }
        );
        // A message of the right name from the wrong side is refused too.
        let err = DestinationState::Restoring { lazy: false }
            .next(Received, &Restored::default().into())
            .unwrap_err();
        assert_eq!(err.direction, Received);
        // Pages are complete only in a lazy restore, and only once restored.
        for state in [
            DestinationState::AwaitingCommit,
            DestinationState::Restoring { lazy: true },
        ] {
            assert!(state.next(Sent, &PagesComplete::default().into()).is_err());
        }
        // No round after the final dump.
        assert!(DestinationState::Restoring { lazy: false }
            .next(Received, &RoundSent::default().into())
            .is_err());
    }

    #[test]
    fn abort_is_accepted_in_every_non_final_state() {
        let steps = path(true, 1);
        let states = walk(&steps);
        for state in &states[..states.len() - 1] {
            assert_eq!(
                state.next(Received, &Abort::default().into()).unwrap(),
                DestinationState::Aborted,
                "abort in {state:?}"
            );
        }
        assert!(states
            .last()
            .unwrap()
            .next(Received, &Abort::default().into())
            .is_err());
    }

    #[test]
    fn only_states_after_restore_hold_the_container() {
        for lazy in [false, true] {
            let states = walk(&path(lazy, 1));
            let first_holding = states
                .iter()
                .position(|s| s.holds_restored_container())
                .unwrap();
            assert!(matches!(
                states[first_holding - 1],
                DestinationState::Restoring { .. }
            ));
            assert!(states[first_holding..]
                .iter()
                .all(|s| s.holds_restored_container()));
        }
    }

    #[test]
    fn lost_links_are_waited_out_once_a_lazy_restore_began() {
        let waits: Vec<_> = walk(&path(true, 0))
            .into_iter()
            .map(|s| (s, s.waits_for_resume()))
            .collect();
        for (state, waits) in waits {
            let expected = matches!(
                state,
                DestinationState::Restoring { lazy: true } | DestinationState::ReceivingPages
            );
            assert_eq!(waits, expected, "{state:?}");
        }
        assert!(!DestinationState::Restoring { lazy: false }.waits_for_resume());
    }

    #[test]
    fn empty_message_is_refused() {
        let err = DestinationState::AwaitingHello
            .next(Received, &ControlMessage::default())
            .unwrap_err();
        assert_eq!(err.message, "empty message");
    }
}
