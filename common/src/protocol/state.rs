//! The destination's side of the exchange as an explicit state machine.
//!
//! ```text
//! AwaitingHello ─Hello▸ Preflighting ─PreflightReply(accepted)▸ ReceivingLayers
//!                            └─PreflightReply(refused)▸ Refused
//! ReceivingLayers ─LayersSent▸ VerifyingLayers ─LayersReady▸ AwaitingCheckpoint
//! AwaitingCheckpoint ─CheckpointSent▸ Restoring ─Restored▸ AwaitingCommit
//! AwaitingCommit ─Commit▸ Committing ─Committed▸ Completed
//! any non-final state ─Abort (either way)▸ Aborted;  ─Failed (sent)▸ Failed
//! ```
//!
//! `▸` after a received message name means the source sent it, after a reply
//! name that the destination sent it. A message that does not fit the current
//! state is a [`ProtocolError`] naming both; the daemon then aborts.

use super::messages::{Body, ControlMessage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationState {
    AwaitingHello,
    Preflighting,
    ReceivingLayers,
    VerifyingLayers,
    AwaitingCheckpoint,
    Restoring,
    AwaitingCommit,
    Committing,
    Completed,
    Refused,
    Failed,
    Aborted,
}

/// Which way a message travelled, seen from the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Received,
    Sent,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("protocol violation: {direction:?} {message} while {state:?}")]
pub struct ProtocolError {
    pub state: DestinationState,
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
            Self::AwaitingCommit | Self::Committing | Self::Completed
        )
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
            (S::VerifyingLayers, Sent, Some(Body::LayersReady(_))) => Some(S::AwaitingCheckpoint),
            (S::AwaitingCheckpoint, Received, Some(Body::CheckpointSent(_))) => Some(S::Restoring),
            (S::Restoring, Sent, Some(Body::Restored(_))) => Some(S::AwaitingCommit),
            (S::AwaitingCommit, Received, Some(Body::Commit(_))) => Some(S::Committing),
            (S::Committing, Sent, Some(Body::Committed(_))) => Some(S::Completed),
            _ => None,
        };
        next.ok_or(ProtocolError {
            state: self,
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

    fn happy_path() -> Vec<(Direction, ControlMessage)> {
        vec![
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
            (Received, CheckpointSent::default().into()),
            (Sent, Restored::default().into()),
            (Received, Commit {}.into()),
            (Sent, Committed {}.into()),
        ]
    }

    #[test]
    fn happy_path_completes() {
        let mut state = DestinationState::AwaitingHello;
        for (dir, msg) in happy_path() {
            state = state.next(dir, &msg).unwrap();
        }
        assert_eq!(state, DestinationState::Completed);
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
        assert_eq!(err.state, DestinationState::Refused);
        assert_eq!(err.message, "LayersSent");
    }

    #[test]
    fn out_of_order_message_names_state_and_message() {
        let err = DestinationState::AwaitingHello
            .next(Received, &CheckpointSent::default().into())
            .unwrap_err();
        assert_eq!(
            err,
            ProtocolError {
                state: DestinationState::AwaitingHello,
                direction: Received,
                message: "CheckpointSent",
            }
        );
        // A message of the right name from the wrong side is refused too.
        let err = DestinationState::Restoring
            .next(Received, &Restored::default().into())
            .unwrap_err();
        assert_eq!(err.direction, Received);
    }

    #[test]
    fn abort_is_accepted_in_every_non_final_state() {
        let mut state = DestinationState::AwaitingHello;
        for (dir, msg) in happy_path() {
            assert_eq!(
                state.next(Received, &Abort::default().into()).unwrap(),
                DestinationState::Aborted,
                "abort in {state:?}"
            );
            state = state.next(dir, &msg).unwrap();
        }
        assert!(state.next(Received, &Abort::default().into()).is_err());
    }

    #[test]
    fn only_states_after_restore_hold_the_container() {
        let mut state = DestinationState::AwaitingHello;
        let mut held = Vec::new();
        for (dir, msg) in happy_path() {
            held.push(state.holds_restored_container());
            state = state.next(dir, &msg).unwrap();
        }
        held.push(state.holds_restored_container());
        assert_eq!(
            held,
            [false, false, false, false, false, false, true, true, true]
        );
    }

    #[test]
    fn empty_message_is_refused() {
        let err = DestinationState::AwaitingHello
            .next(Received, &ControlMessage::default())
            .unwrap_err();
        assert_eq!(err.message, "empty message");
    }
}
