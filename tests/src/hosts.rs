//! The two "hosts" of a test: network namespaces joined by a veth pair,
//! and a partition of the link between them.

use std::path::Path;
use std::process::Command;

use crate::{sh, DST_ADDR, SRC_ADDR};

/// Two network namespaces joined by a veth pair.
#[derive(Debug)]
pub struct Hosts {
    pub src: String,
    pub dst: String,
}

impl Hosts {
    pub fn new(n: u32) -> Self {
        let hosts = Self {
            src: format!("me{n}s"),
            dst: format!("me{n}d"),
        };
        let ip = |args: &[&str]| sh(Command::new("ip").args(args));
        ip(&["netns", "add", &hosts.src]);
        ip(&["netns", "add", &hosts.dst]);
        let (vs, vd) = (format!("ve{n}s"), format!("ve{n}d"));
        ip(&["link", "add", &vs, "type", "veth", "peer", "name", &vd]);
        ip(&["link", "set", &vs, "netns", &hosts.src]);
        ip(&["link", "set", &vd, "netns", &hosts.dst]);
        ip(&[
            "-n",
            &hosts.src,
            "addr",
            "add",
            &format!("{SRC_ADDR}/24"),
            "dev",
            &vs,
        ]);
        ip(&[
            "-n",
            &hosts.dst,
            "addr",
            "add",
            &format!("{DST_ADDR}/24"),
            "dev",
            &vd,
        ]);
        for (ns, dev) in [(&hosts.src, &vs), (&hosts.dst, &vd)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        hosts
    }

    /// A command run "on" a host: in its network namespace only (not `ip
    /// netns exec`, whose private mount namespace would hide our mounts).
    pub fn on(&self, ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
        cmd
    }
}

/// The link between the hosts cut: every packet in or out of the source
/// host's namespace dropped, as a network partition would, until dropped.
#[derive(Debug)]
pub struct LinkCut {
    ns: String,
    chains: &'static [&'static str],
}

impl LinkCut {
    fn rules(ns: &str, chains: &[&str], op: &str) {
        for chain in chains {
            let out = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .args(["iptables", "-w", op, chain, "-j", "DROP"])
                .output()
                .unwrap();
            assert!(
                out.status.success() || op == "-D",
                "iptables {op} {chain} in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        Self::rules(&self.ns, self.chains, "-D");
    }
}

impl Hosts {
    /// Cuts the link until the returned guard is dropped.
    pub fn cut_link(&self) -> LinkCut {
        self.cut(&["INPUT", "OUTPUT"])
    }

    /// Cuts the link one way: what the source sends is lost, what it
    /// receives still arrives.
    pub fn cut_link_to_destination(&self) -> LinkCut {
        self.cut(&["OUTPUT"])
    }

    fn cut(&self, chains: &'static [&'static str]) -> LinkCut {
        LinkCut::rules(&self.src, chains, "-I");
        LinkCut {
            ns: self.src.clone(),
            chains,
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
