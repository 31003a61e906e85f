//! The migration protocol between the source agent (`migrate`) and the
//! destination daemon (`migrate-dst`).
//!
//! One QUIC connection (mutual TLS, see [`crate::transport`]) carries one
//! migration; in post-copy a lost connection is replaced by another that
//! carries on ([`Resume`]). The source opens a single bidirectional
//! **control stream** that carries length-prefixed prost messages
//! ([`framing`]); bulk data (layers, CRIU image files, the rootfs base and
//! delta) travels on unidirectional **data streams**, one per file (a large
//! image: one per 32 MiB segment, at the offset the header names), each
//! starting with a [`messages::StreamHeader`] frame followed by the file's
//! bytes, zstd-compressed or as they are, as the header's codec says
//! ([`crate::transfer`]). Post-copy adds one
//! bidirectional **page tunnel** stream that relays CRIU's page-server
//! connection ([`crate::tunnel`]).
//!
//! ```text
//!  source (migrate)                                  destination (migrate-dst)
//!  ----------------                                  -------------------------
//!  Hello{version, id, mode, config, layers, sizes,
//!        cpuinfo} ─────────────────────────────────► admit: the certificate's name
//!                                                     in --allow (else refused);
//!                                                     preflight: criu check, runc,
//!                                                     lazy pages, cpuinfo check,
//!                                                     disk, memory, id, layers,
//!                                                     cgroup, the config within
//!                                                     the policy
//!                       ◄── PreflightReply{accepted | refusals, checks, missing layers}
//!  (preflight_only: stop here, nothing claimed)
//!  (refused: stop here, container untouched)
//!  data: Layer(digest)…,  LayersSent ──────────────► unpack into the layer store,
//!                       ◄── LayersReady               verify digests
//!  data: UpperDir (container running) ─────────────► unpack into upper/
//!  pre-copy, hybrid — repeated while the rule says so:
//!    runc checkpoint --pre-dump [--parent-path ../n-1]
//!    data: Image(round n)…,  RoundSent{n, files} ──► images/n/ (parent → ../n-1)
//!  auto compression: data: Probe (32 MiB, as is) ──► read and dropped
//!  freeze:
//!    eager: runc checkpoint [--parent-path ../n], held in CRIU's post-dump;
//!      data: Image(final, pages-*.img @offset)… as CRIU writes them
//!    lazy:  runc checkpoint --lazy-pages [--parent-path ../n]; cgroup frozen again
//!  data: Image(final)…, UpperDelta ────────────────► images/final/ (on a tmpfs),
//!                                                     delta on upper/
//!  CheckpointSent{files, parent_round, lazy} ──────► verify every checksum, mount,
//!                                                     bundle; lazy: criu lazy-pages;
//!                                                     runc restore -d [--lazy-pages],
//!                                                     held at CRIU's post-restore
//!                       ◄── Restored{restore_ms} | Failed{stage, message, log}
//!  the decision: record it durably; eager: CRIU ends the source copy
//!  Release ────────────────────────────────────────► the hook lets the copy run
//!                       ◄── Released
//!  lazy only:  page tunnel ◄──── CRIU page requests and pages ────► lazy-pages daemon
//!                       ◄── PagesComplete (daemon has every page and ended)
//!  runc delete, clean up
//!  Commit ─────────────────────────────────────────► forget the rollback state
//!                       ◄── Committed
//!
//!  before the decision, any failure (Ctrl-C, timeout, lost link, Failed):
//!  Abort ──────────────────────────────────────────► the hook kills the held copy;
//!                       ◄── Discarded                 everything it made is removed
//!  CRIU resumes the frozen container on the source
//!
//!  a lost connection once the destination may hold a copy (new connection,
//!  from migrate or from `migrate resolve`):
//!  Resume{migration id | container id, tunnel bytes} ► admit; the held session
//!                       ◄── Resumed{restored?, released?, pages complete?, tunnel bytes}
//!  after the decision: Release again if not released; page tunnel again,
//!  from where each side stopped
//! ```
//!
//! Either side may send [`messages::Abort`] before the decision; the
//! destination then removes everything it created for the migration (a held
//! copy is killed, never run) and the source resumes the container. The
//! destination's side of the exchange is the explicit state machine in
//! [`state`], the source's is [`source`], which also says what a failure in
//! each phase requires; the gates that hold a container on either side are
//! [`crate::hook`], and the durable records the decision lives in
//! [`crate::record`].
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
pub use framing::{read_frame, read_frame_within, write_frame, FrameError, MAX_FRAME_LEN};
pub use messages::*;
pub use source::{Recovery, SourcePhase, SourceState};
pub use state::{DestinationState, Direction, ProtocolError};

/// Bumped on any incompatible change to messages or to the order of the
/// exchange (4: the page tunnel's data frames carry a checksum).
pub const PROTOCOL_VERSION: u32 = 4;
