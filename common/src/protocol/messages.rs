//! Wire messages. They are plain prost types declared by hand (no protoc
//! step): field tags are the compatibility contract, so never reuse a tag.

/// The one envelope that travels on the control stream, in both directions.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ControlMessage {
    #[prost(
        oneof = "Body",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17"
    )]
    pub body: Option<Body>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    #[prost(message, tag = "1")]
    Hello(Hello),
    #[prost(message, tag = "2")]
    PreflightReply(PreflightReply),
    #[prost(message, tag = "3")]
    LayersSent(LayersSent),
    #[prost(message, tag = "4")]
    LayersReady(LayersReady),
    #[prost(message, tag = "5")]
    CheckpointSent(CheckpointSent),
    #[prost(message, tag = "6")]
    Restored(Restored),
    #[prost(message, tag = "7")]
    Failed(Failed),
    #[prost(message, tag = "8")]
    Commit(Commit),
    #[prost(message, tag = "9")]
    Committed(Committed),
    #[prost(message, tag = "10")]
    Abort(Abort),
    #[prost(message, tag = "11")]
    RoundSent(RoundSent),
    #[prost(message, tag = "12")]
    PagesComplete(PagesComplete),
    #[prost(message, tag = "13")]
    Resume(Resume),
    #[prost(message, tag = "14")]
    Resumed(Resumed),
    #[prost(message, tag = "15")]
    Release(Release),
    #[prost(message, tag = "16")]
    Released(Released),
    #[prost(message, tag = "17")]
    Discarded(Discarded),
}

impl ControlMessage {
    /// The message's name, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match &self.body {
            None => "empty message",
            Some(Body::Hello(_)) => "Hello",
            Some(Body::PreflightReply(_)) => "PreflightReply",
            Some(Body::LayersSent(_)) => "LayersSent",
            Some(Body::LayersReady(_)) => "LayersReady",
            Some(Body::CheckpointSent(_)) => "CheckpointSent",
            Some(Body::Restored(_)) => "Restored",
            Some(Body::Failed(_)) => "Failed",
            Some(Body::Commit(_)) => "Commit",
            Some(Body::Committed(_)) => "Committed",
            Some(Body::Abort(_)) => "Abort",
            Some(Body::RoundSent(_)) => "RoundSent",
            Some(Body::PagesComplete(_)) => "PagesComplete",
            Some(Body::Resume(_)) => "Resume",
            Some(Body::Resumed(_)) => "Resumed",
            Some(Body::Release(_)) => "Release",
            Some(Body::Released(_)) => "Released",
            Some(Body::Discarded(_)) => "Discarded",
        }
    }
}

macro_rules! into_control_message {
    ($($variant:ident),*) => {
        $(impl From<$variant> for ControlMessage {
            fn from(msg: $variant) -> Self {
                ControlMessage { body: Some(Body::$variant(msg)) }
            }
        })*
    };
}
into_control_message!(
    Hello,
    PreflightReply,
    LayersSent,
    LayersReady,
    CheckpointSent,
    Restored,
    Failed,
    Commit,
    Committed,
    Abort,
    RoundSent,
    PagesComplete,
    Resume,
    Resumed,
    Release,
    Released,
    Discarded
);

/// Source → destination, first message: who we are, what we want to move, and
/// how big it is, so the destination can refuse before anything is frozen.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    #[prost(string, tag = "2")]
    pub container_id: String,
    /// The container's OCI config.json as found in its bundle on the source.
    #[prost(string, tag = "3")]
    pub config_json: String,
    /// Overlay lower layers, uppermost first (overlayfs `lowerdir` order).
    #[prost(message, repeated, tag = "4")]
    pub layers: Vec<LayerInfo>,
    /// Bytes in the overlay upper dir (the container's rootfs changes).
    #[prost(uint64, tag = "5")]
    pub upper_bytes: u64,
    /// Memory charged to the container's cgroup: a bound on the CRIU images.
    #[prost(uint64, tag = "6")]
    pub memory_bytes: u64,
    #[prost(string, tag = "7")]
    pub source_criu_version: String,
    /// CRIU options that restore must repeat: established TCP connections
    /// stay open (otherwise they are restored closed).
    #[prost(bool, tag = "8")]
    pub tcp_established: bool,
    /// How memory will move; the destination checks it can take part.
    #[prost(enumeration = "MemoryMode", tag = "9")]
    pub mode: i32,
    /// Random, chosen by the source: names this migration when a lost
    /// connection is replaced ([`Resume`]).
    #[prost(string, tag = "10")]
    pub migration_id: String,
    /// The other CRIU options the dump used and the restore must repeat, by
    /// their CRIU names (see `runc::CriuOptions::names`); a destination
    /// refuses names it does not know.
    #[prost(string, repeated, tag = "11")]
    pub criu_options: Vec<String>,
    /// Only the verdict is wanted (`migrate check`, `migrate drain
    /// --dry-run`): the destination claims nothing and the exchange ends
    /// with its `PreflightReply`.
    #[prost(bool, tag = "12")]
    pub preflight_only: bool,
    /// The source's `criu cpuinfo dump` image (`cpuinfo.img`), for the
    /// destination's `criu cpuinfo check`: a CPU without the source's
    /// features is refused before anything is frozen. Empty from a source
    /// that sends none; at most [`MAX_CPUINFO_BYTES`].
    #[prost(bytes = "vec", tag = "13")]
    pub cpuinfo: Vec<u8>,
    /// The container's network identity on the source, for the destination
    /// to recreate before the sockets are restored; none for a container
    /// with no interface but loopback (or none of its own).
    #[prost(message, optional, tag = "14")]
    pub network: Option<NetworkIdentity>,
}

/// A container's interfaces (loopback aside) and routes, as the source
/// found them in its network namespace. Untrusted on the destination:
/// `crate::netns::identity` checks it before anything is made of it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct NetworkIdentity {
    #[prost(message, repeated, tag = "1")]
    pub interfaces: Vec<NetInterface>,
    /// Routes besides those the kernel makes for the addresses.
    #[prost(message, repeated, tag = "2")]
    pub routes: Vec<NetRoute>,
}

/// One interface of the container: a veth whose peer on the host is a
/// port of a bridge.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct NetInterface {
    /// Its name inside the container ("eth0").
    #[prost(string, tag = "1")]
    pub name: String,
    /// "02:42:0a:4d:00:0a".
    #[prost(string, tag = "2")]
    pub mac: String,
    #[prost(uint32, tag = "3")]
    pub mtu: u32,
    /// "10.77.0.10/24", "fd00:77::10/64": the addresses of global scope.
    #[prost(string, repeated, tag = "4")]
    pub addresses: Vec<String>,
    /// The bridge the host's end is a port of.
    #[prost(string, tag = "5")]
    pub bridge: String,
    /// The host's end on the source (its name there, for messages).
    #[prost(string, tag = "6")]
    pub host_peer: String,
}

/// A route of the container's main table.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct NetRoute {
    /// "default" or a prefix, "10.0.0.0/8".
    #[prost(string, tag = "1")]
    pub destination: String,
    /// Next hop; empty for a route on the link.
    #[prost(string, tag = "2")]
    pub gateway: String,
    /// The interface, by its name inside the container.
    #[prost(string, tag = "3")]
    pub device: String,
}

/// Largest `Hello.cpuinfo` a destination takes: CRIU's x86 image is about
/// 130 bytes, and the image is written to disk before CRIU reads it.
pub const MAX_CPUINFO_BYTES: usize = 64 << 10;

/// How the container's memory moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MemoryMode {
    Invalid = 0,
    /// Everything while frozen.
    StopAndCopy = 1,
    /// Pre-dump rounds while running, then the pages dirtied since, frozen.
    PreCopy = 2,
    /// Everything but memory while frozen; memory after the restore.
    PostCopy = 3,
    /// Pre-dump rounds, then post-copy for what is left.
    Hybrid = 4,
}

impl MemoryMode {
    /// Whether the destination restores before it has the memory.
    pub fn is_lazy(self) -> bool {
        matches!(self, Self::PostCopy | Self::Hybrid)
    }
}

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct LayerInfo {
    /// Content digest, see [`crate::rootfs::digest::LayerDigest`].
    #[prost(string, tag = "1")]
    pub digest: String,
    #[prost(uint64, tag = "2")]
    pub size_bytes: u64,
}

/// Destination → source: the preflight verdict.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PreflightReply {
    #[prost(bool, tag = "1")]
    pub accepted: bool,
    /// Every reason the destination cannot take the container; empty when
    /// accepted.
    #[prost(string, repeated, tag = "2")]
    pub refusals: Vec<String>,
    #[prost(string, tag = "3")]
    pub criu_version: String,
    #[prost(string, tag = "4")]
    pub runc_version: String,
    #[prost(uint64, tag = "5")]
    pub free_bytes: u64,
    /// Digests of the layers the destination's store lacks; the source sends
    /// exactly these.
    #[prost(string, repeated, tag = "6")]
    pub missing_layers: Vec<String>,
    #[prost(string, tag = "7")]
    pub hostname: String,
    /// Whether this host can restore with lazy pages (post-copy, hybrid);
    /// when not, `lazy_pages_problem` says why.
    #[prost(bool, tag = "8")]
    pub lazy_pages: bool,
    #[prost(string, tag = "9")]
    pub lazy_pages_problem: String,
    /// `MemAvailable` of the destination's /proc/meminfo: with
    /// `free_bytes`, what a drain spreads containers by.
    #[prost(uint64, tag = "10")]
    pub mem_available_bytes: u64,
    /// Every check the destination ran, in a fixed order, passed or not;
    /// `refusals` repeats the failed ones' reasons.
    #[prost(message, repeated, tag = "11")]
    pub checks: Vec<PreflightCheck>,
    /// Free bytes of the destination's image dir (a tmpfs): a container's
    /// images are there from their arrival to the end of its restore.
    #[prost(uint64, tag = "12")]
    pub image_free_bytes: u64,
}

/// One preflight check's verdict: `migrate check` prints one line per item.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PreflightCheck {
    /// What was checked ("cpu", "disk", ...).
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(bool, tag = "2")]
    pub ok: bool,
    /// What was found; for a failed check, why it failed.
    #[prost(string, tag = "3")]
    pub detail: String,
}

/// Source → destination: every missing layer has been sent on its own data
/// stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LayersSent {
    #[prost(message, repeated, tag = "1")]
    pub files: Vec<FileDigest>,
}

/// Destination → source: all layers are in the store and verified.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LayersReady {}

/// Source → destination: the images of one pre-dump round (numbered from 1)
/// have been sent, while the container runs; the manifest to verify them by.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RoundSent {
    #[prost(uint32, tag = "1")]
    pub round: u32,
    #[prost(message, repeated, tag = "2")]
    pub files: Vec<FileDigest>,
}

/// Source → destination: the container is frozen and the final dump's image
/// files, the upper dir sent while it ran and the changes since have all
/// been sent; the manifest to verify them by.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckpointSent {
    #[prost(message, repeated, tag = "1")]
    pub files: Vec<FileDigest>,
    /// The last pre-dump round the final dump builds on; 0 for none.
    #[prost(uint32, tag = "2")]
    pub parent_round: u32,
    /// Memory is not in the images: restore with lazy pages, fetched over
    /// the page tunnel.
    #[prost(bool, tag = "3")]
    pub lazy: bool,
    /// The container's TCP connections to peers outside it, as its kernel
    /// held them at the dump, when they are restored closed (no
    /// `tcp_established`) and its address moves with it: the destination
    /// tells each peer its connection is gone. Untrusted: the destination
    /// uses at most [`MAX_CLOSED_CONNECTIONS`], and only those from the
    /// container's own addresses.
    #[prost(message, repeated, tag = "4")]
    pub closed_connections: Vec<TcpConnection>,
}

/// One TCP connection: its two ends, "10.77.0.10:7000", "[fd00:77::10]:7000".
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct TcpConnection {
    #[prost(string, tag = "1")]
    pub local: String,
    #[prost(string, tag = "2")]
    pub remote: String,
}

/// Most `CheckpointSent.closed_connections` a destination tells the peers
/// of; the peers of the others find out when they time out.
pub const MAX_CLOSED_CONNECTIONS: usize = 4096;

/// Checksum of one data stream's uncompressed content.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct FileDigest {
    #[prost(enumeration = "StreamKind", tag = "1")]
    pub kind: i32,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint64, tag = "3")]
    pub raw_bytes: u64,
    /// blake3 of the uncompressed bytes, lowercase hex.
    #[prost(string, tag = "4")]
    pub blake3: String,
    /// For images: the pre-dump round (1, 2, ...) or 0 for the final dump.
    #[prost(uint32, tag = "5")]
    pub round: u32,
    /// Where in the file this stream's bytes go: a large image is sent as
    /// several segments (see [`StreamHeader::offset`]); 0 for a whole file.
    #[prost(uint64, tag = "6")]
    pub offset: u64,
}

/// Destination → source: the container is restored on the destination and
/// held there, its processes not running, until the source decides
/// ([`Release`] or [`Abort`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Restored {
    #[prost(uint64, tag = "1")]
    pub restore_ms: u64,
    /// Host pid of the restored container's init, as runc reports it.
    #[prost(uint32, tag = "2")]
    pub pid: u32,
}

/// Source → destination: the decision: the destination's copy is the
/// container (the source has recorded that and ended, or is ending, its
/// own); let it run.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Release {}

/// Destination → source: the released container runs on the destination.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Released {
    /// Milliseconds from the release to the processes running.
    #[prost(uint64, tag = "1")]
    pub release_ms: u64,
}

/// Destination → source, after an [`Abort`]: everything the migration made
/// here is gone, a held copy included.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Discarded {}

/// Destination → source: a step failed; the destination has already removed
/// what it created.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Failed {
    /// Which step failed, e.g. "restore".
    #[prost(string, tag = "1")]
    pub stage: String,
    /// The error with its whole chain of causes.
    #[prost(string, tag = "2")]
    pub message: String,
    /// The last lines of the destination's CRIU log, when CRIU ran.
    #[prost(string, tag = "3")]
    pub criu_log_tail: String,
}

/// Source → destination: the source container is gone; the destination's copy
/// is now the only one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Commit {}

/// Destination → source: the commit is recorded; the connection may close.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Committed {}

/// Destination → source (post-copy): the lazy-pages daemon has every page
/// and has ended; the source's original may go.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagesComplete {
    /// Pages copied into the restored processes.
    #[prost(uint64, tag = "1")]
    pub pages: u64,
    /// Milliseconds from the restore to the last page.
    #[prost(uint64, tag = "2")]
    pub after_restore_ms: u64,
}

/// Source → destination, first message of a connection that replaces a
/// lost one once the destination may hold a restored copy (or of `migrate
/// resolve`): carry on with this migration.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resume {
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    #[prost(string, tag = "2")]
    pub migration_id: String,
    /// Bytes of the destination's page-tunnel stream the source has taken.
    #[prost(uint64, tag = "3")]
    pub tunnel_delivered: u64,
    /// With an empty `migration_id`: asks what the destination holds of
    /// this container (`migrate resolve` without a record).
    #[prost(string, tag = "4")]
    pub container_id: String,
}

/// Destination → source: the migration goes on; where it stands.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resumed {
    /// Bytes of the source's page-tunnel stream the destination has taken.
    #[prost(uint64, tag = "1")]
    pub tunnel_delivered: u64,
    /// Set once the container is restored on the destination (held until
    /// released).
    #[prost(message, optional, tag = "2")]
    pub restored: Option<Restored>,
    /// Set once every page has arrived.
    #[prost(message, optional, tag = "3")]
    pub pages_complete: Option<PagesComplete>,
    /// Set when the destination failed (and says what it did about it).
    #[prost(message, optional, tag = "4")]
    pub failed: Option<Failed>,
    /// Set once the container was released and runs on the destination.
    #[prost(message, optional, tag = "5")]
    pub released: Option<Released>,
    /// Whether memory follows lazily (post-copy, hybrid).
    #[prost(bool, tag = "6")]
    pub lazy: bool,
}

/// Either direction, any state: stop the migration and undo.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Abort {
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// First frame of every data stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamHeader {
    #[prost(enumeration = "StreamKind", tag = "1")]
    pub kind: i32,
    /// Layer digest, image file name, or empty for the upper dir.
    #[prost(string, tag = "2")]
    pub name: String,
    /// For images: the pre-dump round, 0 for the final dump.
    #[prost(uint32, tag = "3")]
    pub round: u32,
    /// Most uncompressed bytes the stream carries, declared before them so that the receiver
    /// can refuse it before taking anything; the receiver stops at the first byte beyond.
    #[prost(uint64, tag = "4")]
    pub declared_bytes: u64,
    /// How the bytes after the header are encoded; absent (0) is zstd, what
    /// every stream was before the field existed.
    #[prost(enumeration = "StreamCodec", tag = "5")]
    pub codec: i32,
    /// For images: where in the file the stream's bytes go. A large page file
    /// comes as several segments, on streams of their own, sent while CRIU
    /// still writes it and side by side; 0 for every other stream.
    #[prost(uint64, tag = "6")]
    pub offset: u64,
}

/// How a data stream's content is encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum StreamCodec {
    /// One zstd frame (the window bounded by the receiver).
    Zstd = 0,
    /// The bytes as they are: for links faster than this host compresses.
    None = 1,
}

/// What a data stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum StreamKind {
    Invalid = 0,
    /// A lower layer directory as a tar archive, named by its digest.
    Layer = 1,
    /// One CRIU image file, named by its file name.
    Image = 2,
    /// The overlay upper dir as a tar archive, sent while the container runs.
    UpperDir = 3,
    /// What changed in the upper dir since [`StreamKind::UpperDir`] was
    /// packed, sent while the container is frozen.
    UpperDelta = 4,
    /// The bidirectional stream that relays CRIU's page-server connection
    /// (post-copy); carries [`crate::tunnel`] frames, not zstd.
    PageTunnel = 5,
    /// Bytes that only measure the link before the freeze (uncompressed,
    /// discarded by the destination; see [`crate::transfer::probe`]).
    Probe = 6,
}
