//! The migration protocol between the source agent (`migrate`) and the
//! destination daemon (`migrate-dst`).
//!
//! One QUIC connection (mutual TLS, see [`crate::transport`]) carries one
//! migration; in post-copy a lost connection is replaced by another that
//! carries on ([`Resume`]). The source opens a single bidirectional
//! **control stream** that carries length-prefixed prost messages
//! ([`framing`]); bulk data (layers, CRIU image files, the rootfs base and
//! delta) travels on unidirectional **data streams**, one per file, each
//! starting with a [`messages::StreamHeader`] frame followed by the file's
//! zstd-compressed bytes ([`crate::transfer`]). Post-copy adds one
//! bidirectional **page tunnel** stream that relays CRIU's page-server
//! connection ([`crate::tunnel`]).
//!
//! ```text
//!  source (migrate)                                  destination (migrate-dst)
//!  ----------------                                  -------------------------
//!  Hello{version, id, mode, config, layers, sizes} ─► preflight: criu check, runc,
//!                                                     lazy pages, disk, id, layers
//!                       ◄── PreflightReply{accepted | refusals, missing layers}
//!  (refused: stop here, container untouched)
//!  data: Layer(digest)…,  LayersSent ──────────────► unpack into the layer store,
//!                       ◄── LayersReady               verify digests
//!  data: UpperDir (container running) ─────────────► unpack into upper/
//!  pre-copy, hybrid — repeated while the rule says so:
//!    runc checkpoint --pre-dump [--parent-path ../n-1]
//!    data: Image(round n)…,  RoundSent{n, files} ──► images/n/ (parent → ../n-1)
//!  freeze:
//!    eager: runc checkpoint [--parent-path ../n], held in CRIU's post-dump
//!    lazy:  runc pause; runc checkpoint --lazy-pages [--parent-path ../n]
//!  data: Image(final)…, UpperDelta ────────────────► images/final/, delta on upper/
//!  CheckpointSent{files, parent_round, lazy} ──────► verify every checksum, mount,
//!                                                     bundle; lazy: criu lazy-pages;
//!                                                     runc restore -d [--lazy-pages]
//!                       ◄── Restored{restore_ms} | Failed{stage, message, log}
//!  lazy only:  page tunnel ◄──── CRIU page requests and pages ────► lazy-pages daemon
//!                       ◄── PagesComplete (daemon has every page and ended)
//!  CRIU ends the source copy; runc delete, clean up
//!  Commit ─────────────────────────────────────────► forget the rollback state
//!                       ◄── Committed
//!
//!  a lost connection, lazy restore under way (new connection):
//!  Resume{migration id, tunnel bytes taken} ───────► the held session
//!                       ◄── Resumed{tunnel bytes taken, restored?, pages complete?}
//!  page tunnel again, from where each side stopped
//! ```
//!
//! Either side may send [`messages::Abort`] in any state; the destination
//! then removes everything it created for the migration, and the source
//! resumes the container. The destination's side of the exchange is the
//! explicit state machine in [`state`], the source's is [`source`], which
//! also says what a failure in each phase requires.
//!
//! Versioning: [`PROTOCOL_VERSION`] is compared in `Hello` and `Resume`; a
//! mismatch is a refusal, never a guess. Enumerations reserve 0 for
//! "invalid" so that a zeroed or missing field is never mistaken for a
//! meaningful value.

pub mod control;
pub mod framing;
pub mod messages;
pub mod source;
pub mod state;

pub use control::{ControlChannel, ControlError};
pub use framing::{read_frame, write_frame, FrameError, MAX_FRAME_LEN};
pub use messages::*;
pub use source::{Recovery, SourcePhase, SourceState};
pub use state::{DestinationState, Direction, ProtocolError};

/// Bumped on any incompatible change to messages or to the order of the
/// exchange.
pub const PROTOCOL_VERSION: u32 = 2;
