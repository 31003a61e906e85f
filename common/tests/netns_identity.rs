//! A container's network identity found and made again, as root: on a
//! "source" (a host namespace with bridge br0, a container namespace with
//! eth0, a veth into it) it is discovered; on a "destination" (another host
//! namespace with a br0 of its own and an empty container namespace) the
//! preflight looks at it, a failed recreate leaves nothing behind, a
//! successful one gives a container that discovery finds the same, and the
//! reset guard turns a refused connection into silence and back, and the
//! announcement of the container's addresses leaves by its interface.
//!
//! Each namespace is held by a `sleep` started under `unshare --net`, so
//! it goes when that process is killed, by the guard's `Drop` or, if the
//! test itself is killed, when the sleep ends. Addresses are in 10.77.0.0/24
//! and fd00:77::/64, inside those namespaces only.

#![allow(clippy::unwrap_used)]

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use migrate_common::netns::{
    addresses_in_use, announcements, check_identity, discover, guard_resets, host_veth_name,
    lift_reset_guard, missing_bridges, recreate, remove_host_end, tell_peers, NetnsError,
};
use migrate_common::protocol::{NetInterface, NetRoute, NetworkIdentity};

fn require_prerequisites() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it makes network namespaces, veths and bridges"
    );
    for (tool, arg) in [
        ("ip", "-V"),
        ("nsenter", "--version"),
        ("unshare", "--version"),
        ("sysctl", "--version"),
        ("iptables", "--version"),
        ("ip6tables", "--version"),
    ] {
        let found = Command::new(tool).arg(arg).output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "{tool} is needed (scripts/setup.sh installs it)"
        );
    }
}

/// A network namespace, held by a process of ours in it.
struct Netns {
    holder: Child,
}

impl Netns {
    fn new() -> Self {
        let holder = Command::new("unshare")
            .args(["--net", "sleep", "300"])
            .spawn()
            .unwrap();
        let ns = Self { holder };
        // Until unshare has made the namespace and become sleep, the pid
        // is still in ours.
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", ns.pid()));
            let theirs = std::fs::read_link(ns.path());
            if comm.is_ok_and(|c| c == "sleep\n") && theirs.is_ok_and(|t| t != ours) {
                return ns;
            }
            assert!(
                Instant::now() < deadline,
                "unshare --net sleep did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.holder.id()
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.pid())
    }

    /// `program args` in this namespace; its stdout.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .arg(program)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `ip` with `args`, split at spaces, in this namespace.
    fn ip(&self, args: &str) -> String {
        self.run("ip", &args.split(' ').collect::<Vec<_>>())
    }

    /// `f` on a thread that has entered this namespace: the commands it
    /// spawns and the sockets it makes are this namespace's (setns applies
    /// to the calling thread, and a child starts in its parent thread's).
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap();
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Its namespace, and every interface in it, ends with it.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A host namespace with bridge br0 up and the gateway's addresses on it.
fn host_with_bridge() -> Netns {
    let host = Netns::new();
    host.ip("link add br0 type bridge");
    host.ip("link set br0 up");
    host.ip("addr add 10.77.0.1/24 dev br0");
    host.ip("addr add fd00:77::1/64 dev br0 nodad");
    host
}

fn expected(host_peer: &str) -> NetworkIdentity {
    let route = |destination: &str, gateway: &str| NetRoute {
        destination: destination.to_owned(),
        gateway: gateway.to_owned(),
        device: "eth0".to_owned(),
    };
    NetworkIdentity {
        interfaces: vec![NetInterface {
            name: "eth0".to_owned(),
            mac: "02:42:0a:4d:00:0a".to_owned(),
            mtu: 1400,
            addresses: vec!["10.77.0.10/24".to_owned(), "fd00:77::10/64".to_owned()],
            bridge: "br0".to_owned(),
            host_peer: host_peer.to_owned(),
        }],
        routes: vec![
            route("default", "10.77.0.1"),
            route("default", "fd00:77::1"),
        ],
    }
}

/// How a connection from the host to `addr` (a closed port) ends.
fn connect(host: &Netns, addr: &str) -> ErrorKind {
    let addr: SocketAddr = addr.parse().unwrap();
    host.within(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
        .map(drop)
        .unwrap_err()
        .kind()
}

/// A packet socket of `host` that receives every frame passing `interface`.
fn capture(host: &Netns, interface: &str) -> OwnedFd {
    host.within(|| {
        let all = i32::from(u16::try_from(libc::ETH_P_ALL).unwrap().to_be());
        // SAFETY: plain syscalls on values made here; results checked.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, all);
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let mut at: libc::sockaddr_ll = std::mem::zeroed();
            at.sll_family = libc::AF_PACKET as u16;
            at.sll_protocol = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
            at.sll_ifindex =
                i32::try_from(nix::net::if_::if_nametoindex(interface).unwrap()).unwrap();
            let size = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            assert_eq!(
                libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(at).cast(), size),
                0
            );
            let wait = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            let len = std::mem::size_of::<libc::timeval>() as u32;
            let set = libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(wait).cast(),
                len,
            );
            assert_eq!(set, 0);
            fd
        }
    })
}

/// The frames `socket` receives until it has been quiet for its timeout.
fn frames(socket: &OwnedFd) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: buf outlives the call and its length is passed.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else {
            return frames;
        };
        frames.push(buf[..n].to_vec());
    }
}

#[test]
fn a_bridged_veth_is_found_and_made_again() {
    require_prerequisites();

    let src_host = host_with_bridge();
    let src = Netns::new();
    src_host.ip(&format!(
        "link add vsrc0 mtu 1400 type veth peer name eth0 netns {}",
        src.pid()
    ));
    src_host.ip("link set vsrc0 master br0 up");
    src.ip("link set eth0 address 02:42:0a:4d:00:0a mtu 1400");
    src.ip("addr add 10.77.0.10/24 dev eth0");
    src.ip("addr add fd00:77::10/64 dev eth0 nodad");
    src.ip("link set lo up");
    src.ip("link set eth0 up");
    src.ip("route add default via 10.77.0.1 dev eth0");
    src.ip("-6 route add default via fd00:77::1 dev eth0");
    let id = src_host.within(|| discover(src.pid())).unwrap().unwrap();
    assert_eq!(id, expected("vsrc0"));

    let dst_host = host_with_bridge();
    let dst = Netns::new();
    let host_name = host_veth_name("netid-test", 0);
    dst_host.within(|| {
        check_identity(&id).unwrap();
        assert!(missing_bridges(&id).unwrap().is_empty());
        assert!(addresses_in_use(&id).unwrap().is_empty());

        let mut elsewhere = id.clone();
        elsewhere.interfaces[0].bridge = "br9".to_owned();
        assert_eq!(missing_bridges(&elsewhere).unwrap(), ["br9"]);
        let mut clashing = id.clone();
        clashing.interfaces[0]
            .addresses
            .push("10.77.0.1/24".to_owned());
        assert_eq!(
            addresses_in_use(&clashing).unwrap(),
            ["10.77.0.1".parse::<std::net::IpAddr>().unwrap()]
        );

        // No br9 here: the pair is made, then fails to join it, and goes.
        let err = recreate(dst.pid(), &elsewhere, std::slice::from_ref(&host_name)).unwrap_err();
        assert!(
            matches!(&err, NetnsError::Step { step, .. } if step.contains("on bridge br9")),
            "{err}"
        );
        assert!(!remove_host_end(&host_name).unwrap());
        assert!(!dst.ip("-j link show").contains("eth0"));

        recreate(dst.pid(), &id, std::slice::from_ref(&host_name)).unwrap();
    });

    let again = dst_host.within(|| discover(dst.pid())).unwrap().unwrap();
    assert_eq!(again, expected(&host_name));
    let sysctl = |path: &str| dst.run("cat", &[path]);
    assert_eq!(sysctl("/proc/sys/net/ipv4/conf/eth0/arp_notify"), "1\n");
    assert_eq!(sysctl("/proc/sys/net/ipv6/conf/eth0/ndisc_notify"), "1\n");

    // Its addresses are announced on the link, out of the host's end.
    let socket = capture(&dst_host, &host_name);
    tell_peers(dst.pid(), &id, &[]).unwrap();
    let seen = frames(&socket);
    let sent = announcements(&id);
    assert_eq!(sent.len(), 2, "one for 10.77.0.10, one for fd00:77::10");
    for announcement in &sent {
        assert!(
            seen.contains(&announcement.frame),
            "{:02x?} not among the {} frames seen on {host_name}",
            announcement.frame,
            seen.len()
        );
    }

    // Port 9 is closed in the new container: the kernel answers with a
    // reset, which the guard keeps in.
    for addr in ["10.77.0.10:9", "[fd00:77::10]:9"] {
        assert_eq!(
            connect(&dst_host, addr),
            ErrorKind::ConnectionRefused,
            "{addr}"
        );
    }
    assert!(!lift_reset_guard(dst.pid()).unwrap());
    guard_resets(dst.pid()).unwrap();
    guard_resets(dst.pid()).unwrap();
    for addr in ["10.77.0.10:9", "[fd00:77::10]:9"] {
        assert_eq!(connect(&dst_host, addr), ErrorKind::TimedOut, "{addr}");
    }
    assert!(lift_reset_guard(dst.pid()).unwrap());
    assert!(!lift_reset_guard(dst.pid()).unwrap());
    assert_eq!(
        connect(&dst_host, "10.77.0.10:9"),
        ErrorKind::ConnectionRefused
    );

    dst_host.within(|| {
        assert!(matches!(
            remove_host_end("br0"),
            Err(NetnsError::NotVeth { .. })
        ));
        assert!(remove_host_end(&host_name).unwrap());
        assert!(!remove_host_end(&host_name).unwrap());
    });
    assert!(!dst.ip("-j link show").contains("eth0"));
}
