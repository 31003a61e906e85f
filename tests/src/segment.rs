//! What the network tests add to the two hosts: a layer-2 segment that
//! both hosts' container bridges are on, a client on it, and the CNI
//! plugin's part on the source (a container's `eth0`, a veth whose host end
//! is a port of the source's bridge).
//!
//! ```text
//!            switch netns (bridge sw0)
//!       ┌──────────┼──────────────┐
//!  source host   destination host   client netns
//!  bridge mbr0   bridge mbr0        eth0 10.77.0.100/24
//!   └ veth ─ container eth0 10.77.0.10/24, 02:77:00:00:00:0a
//! ```
//!
//! Each host's `mbr0` has one uplink, a veth to a port of the switch's
//! bridge; the destination's may be left out ([`DestinationBridge::None`]).
//! Addresses exist only inside namespaces made here. The [`Segment`] guard
//! removes what it made, the [`Attachment`] the container's veth, the
//! [`EchoClient`] its client process (by its pid), even when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{bin, install_binary, sh, wait_until, Hosts, Lab};

/// The container bridge's name, the same on both hosts.
pub const BRIDGE: &str = "mbr0";
pub const CONTAINER_ADDR: &str = "10.77.0.10";
pub const PREFIX_LEN: u8 = 24;
pub const CONTAINER_MAC: &str = "02:77:00:00:00:0a";
pub const MTU: u32 = 1500;
pub const CLIENT_ADDR: &str = "10.77.0.100";
/// `migrate-echo`'s ports in the container.
pub const ECHO_TCP_PORT: u16 = 7000;
pub const ECHO_UDP_PORT: u16 = 7001;
/// The switch's bridge, in its own namespace.
const SWITCH_BRIDGE: &str = "sw0";

/// Whether the destination host gets a container bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationBridge {
    /// `mbr0`, on the segment, as on the source.
    Same,
    /// None: the destination is not on the segment at all.
    None,
}

/// The layer-2 segment: the switch and client namespaces, and a bridge with
/// an uplink on each host. Removed on drop.
#[derive(Debug)]
pub struct Segment {
    /// The switch's network namespace.
    pub switch: String,
    /// The client's network namespace (10.77.0.100 on `eth0`).
    pub client: String,
    /// The hosts' network namespaces.
    pub src: String,
    pub dst: String,
    /// The uplink's name on each host: the port of `mbr0` that goes to the
    /// switch.
    pub uplink: String,
    /// The switch's ports to the source host, the destination host (if it
    /// has a bridge) and the client.
    pub switch_port_src: String,
    pub switch_port_dst: Option<String>,
    pub switch_port_client: String,
    n: u32,
    attached: AtomicU32,
}

fn ip(args: &[&str]) -> String {
    sh(Command::new("ip").args(args))
}

impl Segment {
    /// Puts `hosts` (made with number `n`) on a new segment.
    pub fn new(hosts: &Hosts, n: u32, dst_bridge: DestinationBridge) -> Self {
        let segment = Self {
            switch: format!("me{n}w"),
            client: format!("me{n}c"),
            src: hosts.src.clone(),
            dst: hosts.dst.clone(),
            uplink: format!("me{n}u"),
            switch_port_src: format!("me{n}ws"),
            switch_port_dst: (dst_bridge == DestinationBridge::Same).then(|| format!("me{n}wd")),
            switch_port_client: format!("me{n}wc"),
            n,
            attached: AtomicU32::new(0),
        };
        // The guard exists before what it removes.
        for ns in [&segment.switch, &segment.client] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let sw = segment.switch.as_str();
        ip(&["-n", sw, "link", "add", SWITCH_BRIDGE, "type", "bridge"]);
        ip(&["-n", sw, "link", "set", SWITCH_BRIDGE, "up"]);
        let mut hosts_on = vec![(segment.src.as_str(), segment.switch_port_src.as_str())];
        if let Some(port) = &segment.switch_port_dst {
            hosts_on.push((segment.dst.as_str(), port.as_str()));
        }
        for (host, port) in hosts_on {
            ip(&["-n", host, "link", "add", BRIDGE, "type", "bridge"]);
            ip(&["-n", host, "link", "set", BRIDGE, "up"]);
            // Made in place, one end in each namespace: no name is ever
            // taken in the test runner's own.
            ip(&[
                "-n",
                host,
                "link",
                "add",
                &segment.uplink,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                sw,
            ]);
            ip(&["-n", host, "link", "set", &segment.uplink, "master", BRIDGE]);
            ip(&["-n", host, "link", "set", &segment.uplink, "up"]);
            ip(&["-n", sw, "link", "set", port, "master", SWITCH_BRIDGE]);
            ip(&["-n", sw, "link", "set", port, "up"]);
        }
        let client = segment.client.as_str();
        let port = segment.switch_port_client.as_str();
        ip(&[
            "-n", client, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", sw,
        ]);
        ip(&["-n", sw, "link", "set", port, "master", SWITCH_BRIDGE]);
        ip(&["-n", sw, "link", "set", port, "up"]);
        ip(&[
            "-n",
            client,
            "addr",
            "add",
            &format!("{CLIENT_ADDR}/{PREFIX_LEN}"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", client, "link", "set", "eth0", "up"]);
        segment
    }

    /// The CNI plugin's ADD on the source: a veth pair whose one end is
    /// `eth0` in the network namespace of process `pid` (10.77.0.10/24,
    /// MAC 02:77:00:00:00:0a, MTU 1500, up, no gateway) and whose other end,
    /// on the source host, is a port of its `mbr0`, up.
    pub fn attach(&self, pid: u64) -> Attachment {
        let k = self.attached.fetch_add(1, Ordering::Relaxed);
        let attachment = Attachment {
            host: self.src.clone(),
            host_end: format!("me{}h{k}", self.n),
        };
        let netns = format!("/proc/{pid}/ns/net");
        ip(&[
            "-n",
            &self.src,
            "link",
            "add",
            &attachment.host_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ]);
        let inside = |args: &[&str]| {
            sh(Command::new("nsenter")
                .arg(format!("--net={netns}"))
                .arg("ip")
                .args(args))
        };
        let mtu = MTU.to_string();
        inside(&["link", "set", "eth0", "address", CONTAINER_MAC, "mtu", &mtu]);
        inside(&[
            "addr",
            "add",
            &format!("{CONTAINER_ADDR}/{PREFIX_LEN}"),
            "dev",
            "eth0",
        ]);
        inside(&["link", "set", "eth0", "up"]);
        let end = attachment.host_end.as_str();
        ip(&["-n", &self.src, "link", "set", end, "mtu", &mtu]);
        ip(&["-n", &self.src, "link", "set", end, "master", BRIDGE]);
        ip(&["-n", &self.src, "link", "set", end, "up"]);
        attachment
    }

    /// Waits until the client reaches `addr` (an ICMP echo answered): the
    /// links just made may drop the very first frames, and a test's client
    /// should start on a path that works.
    pub fn wait_reachable(&self, addr: &str) {
        wait_until(
            &format!("the client to reach {addr}"),
            Duration::from_secs(10),
            || {
                self.on_client(Path::new("/bin/busybox"))
                    .args(["ping", "-c", "1", "-W", "1", addr])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
    }

    /// A command run in the client's namespace (network only, as
    /// [`Hosts::on`]).
    pub fn on_client(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.client))
            .arg(program);
        cmd
    }

    /// The names of the links in network namespace `ns` (a host's, the
    /// switch's, the client's).
    pub fn links(&self, ns: &str) -> Vec<String> {
        names(&ip(&["-j", "-n", ns, "link", "show"]))
    }

    /// The veths in `ns`.
    pub fn veths(&self, ns: &str) -> Vec<String> {
        names(&ip(&["-j", "-n", ns, "link", "show", "type", "veth"]))
    }

    /// The ports of host `ns`'s `mbr0`.
    pub fn bridge_ports(&self, ns: &str) -> Vec<String> {
        names(&ip(&["-j", "-n", ns, "link", "show", "master", BRIDGE]))
    }

    /// The switch's port on which it learned `mac`, if it has: where the
    /// switch sends frames for that address.
    pub fn switch_port_of(&self, mac: &str) -> Option<String> {
        let out = sh(Command::new("bridge").args([
            "-j",
            "-n",
            &self.switch,
            "fdb",
            "show",
            "br",
            SWITCH_BRIDGE,
        ]));
        let entries: serde_json::Value = serde_json::from_str(&out).unwrap();
        entries
            .as_array()?
            .iter()
            .find(|e| {
                e["mac"]
                    .as_str()
                    .is_some_and(|m| m.eq_ignore_ascii_case(mac))
            })
            .and_then(|e| e["ifname"].as_str().map(str::to_owned))
    }
}

/// The `ifname`s of `ip -j link show`.
fn names(json: &str) -> Vec<String> {
    let links: serde_json::Value = serde_json::from_str(json).unwrap();
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

impl Drop for Segment {
    fn drop(&mut self) {
        for ns in [&self.switch, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        // The hosts as they were before (deleting a bridge frees its ports;
        // deleting an uplink's end takes its peer, whose namespace is gone
        // anyway). Quiet: a host namespace may be gone already.
        for host in [&self.src, &self.dst] {
            for link in [BRIDGE, self.uplink.as_str()] {
                let _ = Command::new("ip")
                    .args(["-n", host, "link", "del", link])
                    .output();
            }
        }
    }
}

impl Lab {
    /// Puts this lab's hosts on a new [`Segment`].
    pub fn segment(&self, dst_bridge: DestinationBridge) -> Segment {
        Segment::new(&self.hosts, self.n, dst_bridge)
    }
}

/// A container's `eth0` made by [`Segment::attach`]; its host end is
/// deleted on drop (which takes `eth0` too) if it is still there.
#[derive(Debug)]
pub struct Attachment {
    /// The source host's namespace.
    pub host: String,
    /// The veth's end on the source host, a port of its `mbr0`.
    pub host_end: String,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.host, "link", "del", &self.host_end])
            .output();
    }
}

/// The interface `name` in the network namespace of process `pid`, as
/// `ip -j addr show` reports it (`address` is the MAC, `mtu`, `operstate`,
/// `addr_info`), or None if there is none.
pub fn interface_of(pid: u64, name: &str) -> Option<serde_json::Value> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["ip", "-j", "addr", "show", "dev", name])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let mut all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array_mut().and_then(|a| a.pop())
}

/// The IPv4 addresses of `interface` (from [`interface_of`]), as
/// "10.77.0.10/24".
pub fn addresses(interface: &serde_json::Value) -> Vec<String> {
    interface["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
        .collect()
}

/// The peers ("10.77.0.100:40522") of the established TCP connections to
/// local port `port` in the network namespace of process `pid`.
pub fn established_peers(pid: u64, port: u16) -> Vec<String> {
    let out = sh(Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["ss", "-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )")));
    // The peer is the second address:port of a line, whether or not `ss`
    // shows a State column.
    out.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .filter(|w| w.parse::<std::net::SocketAddr>().is_ok())
                .nth(1)
                .map(str::to_owned)
        })
        .collect()
}

/// Copies `migrate-echo` into the lab's layer; before any container starts
/// (the layer is their overlays' lower dir).
pub fn install_echo(lab: &Lab) {
    let echo = bin("migrate-echo");
    assert!(
        echo.exists(),
        "{} is missing: run `cargo build --workspace` first",
        echo.display()
    );
    install_binary(&lab.layer, &echo);
}

/// The container's script: `migrate-echo` on :7000 (TCP) and :7001 (UDP)
/// in the background, and the game (`checks::GAME`) in the foreground,
/// whose token and counter tell a resumed container from a restarted one.
pub fn echo_server() -> String {
    format!(
        "/bin/migrate-echo --tcp {ECHO_TCP_PORT} --udp {ECHO_UDP_PORT} &\n{}",
        crate::checks::GAME
    )
}

/// `migrate-echo-client` in the client namespace, against the container's
/// address; stopped on drop (its stop file, then SIGKILL by its pid).
#[derive(Debug)]
pub struct EchoClient {
    child: Child,
    pub summary_path: PathBuf,
    stop_file: PathBuf,
    pub log: PathBuf,
}

impl EchoClient {
    /// Starts the client named `name` (its files in the lab's dir); with
    /// `reconnect`, it opens a new connection once its first one ended.
    pub fn start(lab: &Lab, segment: &Segment, name: &str, reconnect: bool) -> Self {
        let program = bin("migrate-echo-client");
        assert!(
            program.exists(),
            "{} is missing: run `cargo build --workspace` first",
            program.display()
        );
        let summary_path = lab.path(&format!("client-{name}.json"));
        let stop_file = lab.path(&format!("client-{name}.stop"));
        let log = lab.path(&format!("client-{name}.log"));
        let mut cmd = segment.on_client(&program);
        cmd.arg("--tcp")
            .arg(format!("{CONTAINER_ADDR}:{ECHO_TCP_PORT}"))
            .arg("--udp")
            .arg(format!("{CONTAINER_ADDR}:{ECHO_UDP_PORT}"))
            .arg("--summary")
            .arg(&summary_path)
            .arg("--stop-file")
            .arg(&stop_file)
            .args(["--interval-ms", "5", "--duration-s", "600"]);
        if reconnect {
            cmd.arg("--reconnect");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // nsenter execs the client: this is the client's own pid.
        let child = cmd.spawn().unwrap();
        Self {
            child,
            summary_path,
            stop_file,
            log,
        }
    }

    /// Its latest summary (rewritten every 50 ms), Null before the first.
    pub fn summary(&self) -> serde_json::Value {
        std::fs::read(&self.summary_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Waits until its summary satisfies `cond`; returns that summary.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.summary();
            if cond(&last) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; the client's last summary: {last}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it and returns its last summary.
    pub fn stop(&mut self) -> serde_json::Value {
        self.end();
        let summary = self.summary();
        assert_eq!(
            summary["running"], false,
            "the client did not write its last summary: {summary}"
        );
        summary
    }

    fn end(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = std::fs::write(&self.stop_file, b"");
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EchoClient {
    fn drop(&mut self) {
        self.end();
    }
}

/// Waits until `migrate-echo` in the container listens (its line in the
/// container's output).
pub fn wait_for_echo_server(output: &std::sync::Mutex<String>) {
    wait_until("migrate-echo to listen", Duration::from_secs(10), || {
        output.lock().unwrap().contains("migrate-echo: listening")
    });
}
