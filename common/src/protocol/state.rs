//! The destination's side of the exchange as an explicit state machine (the
//! source's is in [`super::source`]).
//!
//! ```text
//! AwaitingHello ─Hello▸ Preflighting ─PreflightReply(accepted)▸ ReceivingLayers
//!                            └─PreflightReply(refused)▸ Refused
//! ReceivingLayers ─LayersSent▸ VerifyingLayers ─LayersReady▸ PreCopying
//! PreCopying ─RoundSent▸ PreCopying                     (one per pre-dump round)
//! PreCopying ─CheckpointSent{lazy}▸ Restoring{lazy}
//! Restoring{lazy} ─Restored▸ Held{lazy}             (restored, not running)
//! Held{lazy} ─Release▸ Releasing{lazy}
//! Releasing{eager} ─Released▸ AwaitingCommit
//! Releasing{lazy}  ─Released▸ ReceivingPages ─PagesComplete▸ AwaitingCommit
//! AwaitingCommit ─Commit▸ Committing ─Committed▸ Completed
//! any non-final state ─Abort (either way)▸ Aborted ─Discarded▸ Aborted
//! any non-final state ─Failed (sent)▸ Failed
//! ```
//!
//! `▸` after a received message name means the source sent it, after a reply
//! name that the destination sent it. A message that does not fit the current
//! state is a [`ProtocolError`] naming both; the daemon then aborts. A lost
//! connection is not a transition: from `Restoring` on, the session holds
//! what it has and waits for the source (or `migrate resolve`) to come back
//! with [`super::Resume`], and goes on in the state it was in.

use super::messages::{Body, ControlMessage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationState {
    AwaitingHello,
    Preflighting,
    ReceivingLayers,
    VerifyingLayers,
    PreCopying,
    Restoring { lazy: bool },
    Held { lazy: bool },
    Releasing { lazy: bool },
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

    /// Whether the destination holds a restored container, held or
    /// released: it must not be thrown away without an explicit word from
    /// the source, because the source may already have ended its copy.
    pub fn holds_restored_container(self) -> bool {
        matches!(
            self,
            Self::Held { .. }
                | Self::Releasing { .. }
                | Self::ReceivingPages
                | Self::AwaitingCommit
                | Self::Committing
                | Self::Completed
        )
    }

    /// Whether a lost connection is waited out rather than given up: once a
    /// restore may have begun, its outcome is the source's to hear, and a
    /// held copy waits for the source's decision; a lazy copy waits for its
    /// pages. (Once released with every page here, the copy needs nothing
    /// more from the source and is kept whatever happens to the link.)
    pub fn waits_for_resume(self) -> bool {
        matches!(
            self,
            Self::Restoring { .. }
                | Self::Held { .. }
                | Self::Releasing { .. }
                | Self::ReceivingPages
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
            (S::Aborted, Sent, Some(Body::Discarded(_))) => Some(S::Aborted),
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
            (S::Restoring { lazy }, Sent, Some(Body::Restored(_))) => Some(S::Held { lazy }),
            (S::Held { lazy }, Received, Some(Body::Release(_))) => Some(S::Releasing { lazy }),
            (S::Releasing { lazy: false }, Sent, Some(Body::Released(_))) => {
                Some(S::AwaitingCommit)
            }
            (S::Releasing { lazy: true }, Sent, Some(Body::Released(_))) => Some(S::ReceivingPages),
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
        steps.push((Received, Release {}.into()));
        steps.push((Sent, Released::default().into()));
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
            assert_eq!(states[first_holding], DestinationState::Held { lazy });
            assert!(states[first_holding..]
                .iter()
                .all(|s| s.holds_restored_container()));
        }
    }

    #[test]
    fn nothing_runs_before_the_source_releases_it() {
        // Released only after Release, only from a held copy.
        assert!(DestinationState::Restoring { lazy: false }
            .next(Sent, &Released::default().into())
            .is_err());
        assert!(DestinationState::Held { lazy: false }
            .next(Sent, &Released::default().into())
            .is_err());
        assert!(DestinationState::Restoring { lazy: true }
            .next(Received, &Release {}.into())
            .is_err());
        // A held copy can still be given up by the source.
        assert_eq!(
            DestinationState::Held { lazy: true }
                .next(Received, &Abort::default().into())
                .unwrap(),
            DestinationState::Aborted
        );
        assert_eq!(
            DestinationState::Aborted
                .next(Sent, &Discarded {}.into())
                .unwrap(),
            DestinationState::Aborted
        );
    }

    #[test]
    fn lost_links_are_waited_out_once_a_restore_began() {
        for lazy in [false, true] {
            for (state, waits) in walk(&path(lazy, 0))
                .into_iter()
                .map(|s| (s, s.waits_for_resume()))
            {
                let expected = matches!(
                    state,
                    DestinationState::Restoring { .. }
                        | DestinationState::Held { .. }
                        | DestinationState::Releasing { .. }
                        | DestinationState::ReceivingPages
                );
                assert_eq!(waits, expected, "{state:?}");
            }
        }
    }

    #[test]
    fn empty_message_is_refused() {
        let err = DestinationState::AwaitingHello
            .next(Received, &ControlMessage::default())
            .unwrap_err();
        assert_eq!(err.message, "empty message");
    }
}
