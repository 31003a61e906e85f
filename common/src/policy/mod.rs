//! What a destination lets in: which sources may push containers to it
//! (`migrate-dst --allow`), and what a container it receives may do on it
//! (`--allow-bind`, `--allow-privileged`, and [`config`] for the baseline).
//! Pure decisions over names, paths and a [`BundleConfig`]; the daemon
//! wires them into its preflight.
//!
//! A certificate from the CA proves who a peer is, not that it may run
//! containers here: the destination restores what it receives as root, so
//! without this policy every holder of a certificate would be root on every
//! destination.

pub mod config;

use std::fmt;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use rustls_pki_types::ServerName;

use crate::bundle::BundleConfig;
pub use config::Violation;

/// Why a policy cannot be built from the daemon's flags.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("--allow {name:?} is neither a DNS name nor an IP address (write the name the source's certificate carries)")]
    BadName { name: String },
    #[error("--allow-bind {path}: only absolute paths without .. can be allowed")]
    BadBindRoot { path: PathBuf },
}

/// The destination's policy, fixed at its start.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Certificate names of the sources allowed to push containers.
    sources: Vec<SourceName>,
    /// Host directories whose contents containers may bind-mount.
    bind_roots: Vec<PathBuf>,
    /// Whether containers may have more than `runc spec` gives them.
    privileged: bool,
    /// Host bridges a moved container's interfaces may join.
    bridges: Vec<String>,
}

impl Policy {
    /// `sources` are certificate names (DNS names or IP addresses, IPv6 in
    /// brackets or not); `bind_roots` absolute, normalised directories
    /// (the daemon passes each one as given and as it resolves, so that a
    /// source reaching it through either form is recognised).
    pub fn new(
        sources: &[String],
        bind_roots: Vec<PathBuf>,
        privileged: bool,
    ) -> Result<Self, PolicyError> {
        let sources = sources
            .iter()
            .map(|name| SourceName::parse(name))
            .collect::<Result<_, _>>()?;
        if let Some(path) = bind_roots.iter().find(|p| !is_normal_absolute(p)) {
            return Err(PolicyError::BadBindRoot { path: path.clone() });
        }
        Ok(Self {
            sources,
            bind_roots,
            privileged,
            bridges: Vec::new(),
        })
    }

    /// Lets moved containers' interfaces join these host bridges (a
    /// container with a network identity names the bridge its interface was
    /// a port of on the source, and gets a port on the bridge of the same
    /// name here). Without any, none may, unless the policy is privileged.
    pub fn with_bridges(mut self, bridges: &[String]) -> Self {
        self.bridges = bridges.to_vec();
        self
    }

    /// Whether a moved container may get a port on host bridge `name`.
    pub fn bridge_allowed(&self, name: &str) -> bool {
        self.privileged || self.bridges.iter().any(|b| b == name)
    }

    /// The allowed bridges, for messages.
    pub fn bridges_text(&self) -> String {
        if self.privileged {
            "any (--allow-privileged)".into()
        } else if self.bridges.is_empty() {
            "none".into()
        } else {
            format!("--allow-bridge {}", self.bridges.join(", "))
        }
    }

    /// Whether no source at all may push containers here.
    pub fn allows_no_source(&self) -> bool {
        self.sources.is_empty()
    }

    pub fn privileged(&self) -> bool {
        self.privileged
    }

    /// Whether a source whose certificate carries `names` (its CN and
    /// subjectAltNames, all vouched for by the CA) may push containers.
    pub fn admits(&self, names: &[String]) -> bool {
        names
            .iter()
            .filter_map(|n| SourceName::parse(n).ok())
            .any(|n| self.sources.contains(&n))
    }

    /// What a source that [`Self::admits`] refuses is told: who it is to
    /// this destination, and how the destination's operator lets it in.
    pub fn refusal(&self, peer: Option<&str>) -> String {
        let Some(peer) = peer else {
            return "the source's certificate carries no name (no CN or subjectAltName), so this \
                    destination cannot tell who it is: issue it with `migrate certs issue --name`"
                .into();
        };
        let allowed = if self.sources.is_empty() {
            "it allows no source yet".to_owned()
        } else {
            format!("it allows {}", join(&self.sources))
        };
        format!(
            "this destination does not allow source {peer} (the name in its certificate) to \
             migrate containers to it; {allowed}. To allow it, add `--allow {peer}` to \
             migrate-dst's command line on the destination"
        )
    }

    /// Every way `config` exceeds what this destination allows; empty when
    /// the container may come in. Bind sources inside the allowance still
    /// have to be resolved on the host (see [`Self::bind_allowed`]).
    pub fn check(&self, config: &BundleConfig) -> Vec<Violation> {
        if self.privileged {
            return Vec::new();
        }
        let mut found = config::beyond_baseline(config.spec());
        for bind in config.bind_mounts() {
            if bind.source.is_relative() {
                found.push(Violation::RelativeBind {
                    source: bind.source,
                });
            } else if !self.bind_allowed(&bind.source) {
                found.push(Violation::BindOutside {
                    source: bind.source,
                    allowed: self.bind_roots_text(),
                });
            }
        }
        found
    }

    /// Whether host path `source` lies under an allowed bind root, decided
    /// on the path's text alone (so nothing about paths outside the
    /// allowance is looked up): `..` is refused rather than resolved,
    /// because on the host it would resolve through symlinks.
    pub fn bind_allowed(&self, source: &Path) -> bool {
        self.privileged
            || (is_normal_absolute(source) && self.bind_roots.iter().any(|r| source.starts_with(r)))
    }

    /// The allowed bind roots, for messages.
    pub fn bind_roots_text(&self) -> String {
        if self.bind_roots.is_empty() {
            "this destination allows none".into()
        } else {
            let roots: Vec<_> = self.bind_roots.iter().map(|r| r.display()).collect();
            format!("--allow-bind {}", join(&roots))
        }
    }
}

/// A source's certificate name as `--allow` compares it: IP addresses by
/// value (`::1` is `0:0::1`), DNS names without case or a final dot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SourceName {
    Ip(IpAddr),
    Dns(String),
}

impl SourceName {
    fn parse(name: &str) -> Result<Self, PolicyError> {
        let bare = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        let bad = || PolicyError::BadName {
            name: name.to_owned(),
        };
        if let Ok(ip) = bare.parse() {
            return Ok(Self::Ip(ip));
        }
        let dns = bare.strip_suffix('.').unwrap_or(bare);
        // The parser the TLS client uses: what it accepts can be in a
        // certificate issued by `migrate certs issue`.
        match ServerName::try_from(dns) {
            Ok(ServerName::DnsName(_)) => Ok(Self::Dns(dns.to_ascii_lowercase())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for SourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Dns(name) => write!(f, "{name}"),
        }
    }
}

fn is_normal_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn join(items: &[impl fmt::Display]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
