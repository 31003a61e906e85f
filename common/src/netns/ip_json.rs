//! The parts of `ip -j` output (iproute2 6.1) that discovery and the
//! destination's preflight read. Fields iproute2 leaves out when they do
//! not apply (no peer, no master, no gateway) are optional here.

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// One entry of `ip -j -d link show`.
#[derive(Debug, Deserialize)]
pub(super) struct Link {
    pub ifindex: u32,
    pub ifname: String,
    /// For a veth: its peer's ifindex, in the peer's namespace.
    pub link_index: Option<u32>,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub address: String,
    pub master: Option<String>,
    /// Only with `-d`; absent for devices that have no kind (physical ones).
    pub linkinfo: Option<LinkInfo>,
}

#[derive(Debug, Deserialize)]
pub(super) struct LinkInfo {
    pub info_kind: Option<String>,
    /// What the device is a port of: "bridge", "bond".
    pub info_slave_kind: Option<String>,
}

impl Link {
    pub fn kind(&self) -> Option<&str> {
        self.linkinfo.as_ref()?.info_kind.as_deref()
    }

    pub fn port_of(&self) -> Option<&str> {
        self.linkinfo.as_ref()?.info_slave_kind.as_deref()
    }
}

/// One entry of `ip -j addr show`: an interface and its addresses.
#[derive(Debug, Deserialize)]
pub(super) struct AddrLink {
    pub ifindex: u32,
    #[serde(default)]
    pub addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
pub(super) struct AddrInfo {
    pub local: String,
    pub prefixlen: u8,
    /// "global", "link", "host".
    pub scope: String,
}

/// One entry of `ip -j route show`.
#[derive(Debug, Deserialize)]
pub(super) struct Route {
    /// "default", a prefix, or a bare address for a host route.
    pub dst: String,
    pub gateway: Option<String>,
    pub dev: Option<String>,
    /// "kernel" for the routes the kernel makes for an address; absent for
    /// "boot", the default of `ip route add`.
    pub protocol: Option<String>,
    /// Absent for unicast routes; "blackhole", "unreachable", ... otherwise.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// `text`, the output of the command `what` describes, as `T`.
pub(super) fn parse<T: DeserializeOwned>(
    what: &'static str,
    text: &str,
) -> Result<Vec<T>, JsonError> {
    serde_json::from_str(text).map_err(|source| JsonError { what, source })
}

/// Output of `ip -j` that does not have the shape iproute2 6.1 gives it.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the output of `{what}`")]
pub struct JsonError {
    pub what: &'static str,
    #[source]
    pub source: serde_json::Error,
}
