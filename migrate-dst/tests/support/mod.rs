//! The destination daemon and a source-side client together, in-process on
//! loopback with freshly generated certificates; no root, CRIU or runc,
//! unless a test asks for the real CRIU ([`Setup::real_criu`]).

// Each test binary uses its own part of these helpers.
#![allow(clippy::unwrap_used, dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use migrate_common::certs::{create_ca, issue_with_role, Role, TlsDir};
use migrate_common::criu::Criu;
use migrate_common::policy::Policy;
use migrate_common::protocol::{
    Body, ControlChannel, Hello, MemoryMode, PreflightReply, PROTOCOL_VERSION,
};
use migrate_common::runc::Runc;
use migrate_common::transport::{self, TransportError};
use migrate_dst::images::ImageDir;
use migrate_dst::Daemon;

pub type Control = ControlChannel<quinn::SendStream>;

/// The name in the source's certificate.
pub const SOURCE: &str = "src.example";

/// How a test's destination and source are set up.
#[derive(Debug)]
pub struct Setup {
    pub dst_role: Role,
    pub src_role: Role,
    /// `--allow`, `--allow-bind`, `--allow-privileged`.
    pub policy: Policy,
    /// Stand-ins for criu and runc that pass every preflight check, so that
    /// the policy's refusals are the only ones; otherwise tools that do not
    /// exist, and this destination can restore nothing.
    pub working_tools: bool,
    /// With `working_tools`: the installed `criu` instead of its stand-in,
    /// for the checks only CRIU itself can answer (the CPU's); needs root.
    pub real_criu: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            dst_role: Role::Destination,
            src_role: Role::Source,
            policy: allowing(&[SOURCE]),
            working_tools: false,
            real_criu: false,
        }
    }
}

pub fn allowing(sources: &[&str]) -> Policy {
    let sources: Vec<String> = sources.iter().map(|s| (*s).to_owned()).collect();
    Policy::new(&sources, Vec::new(), false).unwrap()
}

/// Issues the certificates and starts the daemon on a free port.
pub async fn start_daemon(
    dir: &Path,
    setup: Setup,
) -> (u16, tokio::task::JoinHandle<anyhow::Result<()>>) {
    create_ca(&dir.join("ca")).unwrap();
    issue_with_role(
        &dir.join("ca"),
        "127.0.0.1",
        setup.dst_role,
        &dir.join("dst"),
    )
    .unwrap();
    issue_with_role(&dir.join("ca"), SOURCE, setup.src_role, &dir.join("src")).unwrap();
    let endpoint = transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &TlsDir::load(&dir.join("dst")).unwrap(),
    )
    .unwrap();
    let port = endpoint.local_addr().unwrap().port();
    let (runc, criu) = if setup.working_tools {
        let criu = if setup.real_criu {
            "criu".into()
        } else {
            fake_tool(dir, "criu", CRIU)
        };
        (fake_tool(dir, "runc", RUNC), criu)
    } else {
        ("/nonexistent/runc".into(), "/nonexistent/criu".into())
    };
    // The image dir must be a tmpfs; it lives as long as the daemon's task.
    let images = tempfile::Builder::new()
        .prefix("migrate-dst-test.")
        .tempdir_in("/dev/shm")
        .unwrap();
    let daemon = Daemon::new(
        dir.join("state"),
        ImageDir::open(images.path()).unwrap(),
        Runc::new(runc, dir.join("runc"), None),
        Criu::new(criu),
        None,
        setup.policy,
    )
    .unwrap();
    let serve = async move {
        let _images = images;
        migrate_dst::serve_on(endpoint, daemon).await
    };
    (port, tokio::spawn(serve))
}

/// Connects to the daemon on `port` as the source would and opens the
/// control stream.
pub async fn connect(
    dir: &Path,
    port: u16,
) -> Result<(quinn::Endpoint, quinn::Connection, Control), TransportError> {
    let tls = TlsDir::load(&dir.join("src")).unwrap();
    let (endpoint, conn) = transport::connect(&format!("127.0.0.1:{port}"), &tls).await?;
    let (send, recv) = conn.open_bi().await.unwrap();
    Ok((endpoint, conn, ControlChannel::new(recv, send)))
}

/// A Hello this destination accepts when its tools work and its policy
/// allows `config_json`.
pub fn hello(container_id: &str, config_json: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        container_id: container_id.into(),
        config_json: config_json.into(),
        mode: MemoryMode::StopAndCopy as i32,
        ..Default::default()
    }
}

/// Sends `hello` and returns the reply.
pub async fn preflight(control: &mut Control, hello: Hello) -> PreflightReply {
    control.send(hello).await.unwrap();
    match control.recv().await.unwrap().body {
        Some(Body::PreflightReply(reply)) => reply,
        other => panic!("expected PreflightReply, got {other:?}"),
    }
}

/// What `runc spec` writes, with what the source agent would change.
pub fn runc_spec() -> serde_json::Value {
    let mut config: serde_json::Value =
        serde_json::from_str(include_str!("../../../common/src/testdata/runc-spec.json")).unwrap();
    config["process"]["terminal"] = false.into();
    config
}

// Just enough of `criu --version`, `criu check`, `runc --version` and `runc
// state` (no container of any name exists).
const CRIU: &str = "#!/bin/sh\ncase \"$1\" in --version) echo 'Version: 4.2.1';; esac\n";
const RUNC: &str =
    "#!/bin/sh\ncase \"$1\" in --version) echo 'runc version 1.1.5';; *) exit 1;; esac\n";

fn fake_tool(dir: &Path, name: &str, script: &str) -> std::path::PathBuf {
    let path = dir.join(format!("fake-{name}"));
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}
