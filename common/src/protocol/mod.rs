//! The migration protocol between the source agent (`migrate`) and the
//! destination daemon (`migrate-dst`).
//!
//! One QUIC connection (mutual TLS, see [`crate::transport`]) carries one
//! migration. The source opens a single bidirectional **control stream** that
//! carries length-prefixed prost messages ([`framing`]); bulk data (layers,
//! CRIU image files, the rootfs diff) travels on unidirectional **data
//! streams**, one per file, each starting with a [`messages::StreamHeader`]
//! frame followed by the file's zstd-compressed bytes ([`crate::transfer`]).
//!
//! ```text
//!  source (migrate)                                destination (migrate-dst)
//!  ----------------                                -------------------------
//!  Hello{version, id, config, layers, sizes} ───►  preflight: criu check, runc,
//!                                                  free disk, id free, layers
//!                      ◄─── PreflightReply{accepted | refusals, missing layers}
//!  (refused: stop here, container untouched)
//!  data streams: Layer(digest)…               ───►  unpack into layer store,
//!  LayersSent{digests}                        ───►  verify digests
//!                      ◄─── LayersReady
//!  freeze + dump (CRIU, post-dump hook blocks)
//!  data streams: Image(name)…, UpperDir       ───►  write, hash, unpack
//!  CheckpointSent{manifest}                   ───►  verify every checksum,
//!                                                  mount overlay, write bundle,
//!                                                  runc restore -d, check running
//!                      ◄─── Restored{restore_ms} | Failed{stage, message, log}
//!  let CRIU finish, runc delete, clean up
//!  Commit                                     ───►  forget the rollback state
//!                      ◄─── Committed
//! ```
//!
//! Either side may send [`messages::Abort`] in any state; the destination
//! then removes everything it created for the migration, and the source lets
//! CRIU resume the frozen container. The destination's side of the exchange
//! is the explicit state machine in [`state`].
//!
//! Versioning: [`PROTOCOL_VERSION`] is compared in `Hello`; a mismatch is a
//! preflight refusal, never a guess. Enumerations reserve 0 for "invalid" so
//! that a zeroed or missing field is never mistaken for a meaningful value.

pub mod control;
pub mod framing;
pub mod messages;
pub mod state;

pub use control::{ControlChannel, ControlError};
pub use framing::{read_frame, write_frame, FrameError, MAX_FRAME_LEN};
pub use messages::*;
pub use state::{DestinationState, Direction, ProtocolError};

/// Bumped on any incompatible change to messages or to the order of the
/// exchange.
pub const PROTOCOL_VERSION: u32 = 1;
