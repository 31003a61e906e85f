//! Harness for the end-to-end tests: two "hosts" (network namespaces joined
//! by a veth pair), a busybox rootfs layer, certificates, a destination
//! daemon and a source container, each removed by a guard's `Drop` even
//! when a test fails.
//!
//! Both hosts share one kernel, so each side gets its own runc root, state
//! dir and cgroup parent. The tests need root, CRIU >= 4.2, runc, iproute2,
//! iptables and busybox-static; `scripts/setup.sh` installs them. A missing
//! prerequisite fails the test with what to install: nothing is skipped.

#![allow(clippy::unwrap_used)]

pub mod checks;
mod destination;
pub mod drain;
mod hosts;
pub mod inventory;
pub mod quake;
pub mod resources;
pub mod segment;
pub mod workloads;

pub use destination::Destination;
pub use hosts::{Hosts, LinkCut};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const SRC_ADDR: &str = "198.18.0.1";
pub const DST_ADDR: &str = "198.18.0.2";
pub const DST_PORT: u16 = 7070;

/// Fails the test unless everything it needs is installed.
pub fn require_prerequisites() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (CRIU, runc, namespaces, mounts)"
    );
    let criu = Command::new("criu").arg("--version").output();
    let version = criu
        .as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let parsed = migrate_common::criu::CriuVersion::parse(&version);
    assert!(
        parsed.is_some_and(|v| v >= migrate_common::criu::MIN_VERSION),
        "CRIU >= {} is required (found {version:?}): run scripts/setup.sh",
        migrate_common::criu::MIN_VERSION
    );
    for (tool, args, package) in [
        ("runc", &["--version"][..], "runc"),
        ("ip", &["-V"][..], "iproute2"),
        ("nsenter", &["--version"][..], "util-linux"),
        ("iptables-restore", &["--version"][..], "iptables"),
    ] {
        let ok = Command::new(tool)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "{tool} is missing: install {package} (scripts/setup.sh does)"
        );
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: install busybox-static (scripts/setup.sh does)"
    );
    for name in ["migrate", "migrate-dst", "migrate-heap"] {
        assert!(
            bin(name).exists(),
            "{} is missing: run `cargo build --workspace` first",
            bin(name).display()
        );
    }
}

/// A binary of this workspace, from the same target dir as the test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test-binary>
    exe.parent().unwrap().parent().unwrap().join(name)
}

/// Runs a command and returns its output; panics with the output if it
/// fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn unique() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::process::id() % 100_000 * 10 + NEXT.fetch_add(1, Ordering::Relaxed) % 10
}

/// Unmounts every mount at or below `dir` (deepest first).
pub fn unmount_under(dir: &Path) {
    let _ = migrate_common::mount::unmount_all_under(dir);
}

pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let entries = migrate_common::rootfs::mountinfo::read_own().unwrap();
    migrate_common::rootfs::mountinfo::mounts_under(&entries, dir)
        .into_iter()
        .map(|e| e.mount_point.clone())
        .collect()
}

/// Everything one test needs; fields drop in order, the temp dir last.
#[derive(Debug)]
pub struct Lab {
    pub n: u32,
    pub hosts: Hosts,
    /// The busybox layer (overlay lower dir).
    pub layer: PathBuf,
    pub tls_src: PathBuf,
    pub tls_dst: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Self {
        require_prerequisites();
        let n = unique();
        let dir = tempfile::Builder::new()
            .prefix("migrate-e2e.")
            .tempdir()
            .unwrap();
        let hosts = Hosts::new(n);
        let root = dir.path();
        let migrate = bin("migrate");
        sh(Command::new(&migrate)
            .args(["certs", "ca", "--out"])
            .arg(root.join("ca")));
        for (name, role, out) in [
            (DST_ADDR, "destination", "tls-dst"),
            (SRC_ADDR, "source", "tls-src"),
        ] {
            sh(Command::new(&migrate)
                .args(["certs", "issue", "--ca"])
                .arg(root.join("ca"))
                .args(["--name", name, "--role", role, "--out"])
                .arg(root.join(out)));
        }
        let layer = root.join("layer");
        make_busybox_rootfs(&layer);
        install_binary(&layer, &bin("migrate-heap"));
        Self {
            n,
            hosts,
            layer,
            tls_src: root.join("tls-src"),
            tls_dst: root.join("tls-dst"),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `--image-dir` of the daemon named `name` (its own, on the
    /// tmpfs of /dev/shm: two daemons of a test must not share one).
    pub fn image_dir(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/dev/shm/migrate-e2e-{}-{name}-images", self.n))
    }

    /// Starts `migrate-dst` on the destination host with `extra` arguments
    /// (its own `--image-dir` unless they name one).
    pub fn start_destination(&self, extra: &[&str]) -> Destination {
        self.start_daemon(&self.hosts.dst, DST_ADDR, &self.tls_dst, "dst", extra)
    }

    /// Starts `migrate-dst` in network namespace `ns`, listening on `addr`
    /// with the certificate in `tls`; its dirs and cgroup parent are named
    /// after `name`, so that daemons sharing this kernel do not meet.
    pub(crate) fn start_daemon(
        &self,
        ns: &str,
        addr: &str,
        tls: &Path,
        name: &str,
        extra: &[&str],
    ) -> Destination {
        let state_dir = self.path(&format!("{name}-state"));
        let image_dir = self.image_dir(name);
        let runc_root = self.path(&format!("runc-{name}"));
        let log = self.path(&format!("migrate-{name}-{}.log", unique()));
        let mut cmd = self.hosts.on(ns, &bin("migrate-dst"));
        if !extra.contains(&"--image-dir") {
            cmd.arg("--image-dir").arg(&image_dir);
        }
        cmd.arg("--listen")
            .arg(format!("{addr}:{DST_PORT}"))
            .arg("--tls-dir")
            .arg(tls)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--runc-root")
            .arg(&runc_root)
            .arg("--cgroup-parent")
            .arg(format!("/migrate-e2e-{}-{name}", self.n))
            // The source's certificate name.
            .args(["--allow", SRC_ADDR])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        let dst = Destination {
            child: Some(child),
            state_dir,
            image_dir,
            runc_root,
            log,
            cgroup_parent: format!("migrate-e2e-{}-{name}", self.n),
        };
        wait_until("migrate-dst to listen", Duration::from_secs(10), || {
            std::fs::read_to_string(&dst.log)
                .unwrap_or_default()
                .contains("listening")
        });
        dst
    }

    /// Starts container `id` on the source host, running `script` under
    /// busybox sh, with its stdout and stderr on a pipe the test reads.
    pub fn start_container(&self, id: &str, script: &str) -> SourceContainer {
        self.start_container_binding(id, script, &[])
    }

    /// [`Lab::start_container`] with host dirs bind-mounted into the
    /// container: (host path, path in the container).
    pub fn start_container_binding(
        &self,
        id: &str,
        script: &str,
        binds: &[(&Path, &str)],
    ) -> SourceContainer {
        let args = ["/bin/sh", "-c", script].map(String::from);
        self.start_container_on(id, std::slice::from_ref(&self.layer), &args, binds)
    }

    /// Starts container `id` on the source host, its rootfs an overlay of
    /// `layers` (uppermost first) running `args`, with `binds` as in
    /// [`Lab::start_container_binding`].
    pub fn start_container_on(
        &self,
        id: &str,
        layers: &[PathBuf],
        args: &[String],
        binds: &[(&Path, &str)],
    ) -> SourceContainer {
        let base = self.path(&format!("src-{id}"));
        let (upper, work, rootfs, bundle) = (
            base.join("upper"),
            base.join("work"),
            base.join("rootfs"),
            base.join("bundle"),
        );
        for d in [&upper, &work, &rootfs, &bundle] {
            std::fs::create_dir_all(d).unwrap();
        }
        let runc_root = self.path("runc-src");
        let cgroup_parent = format!("migrate-e2e-{}-src", self.n);
        // The guard exists before anything it removes, so a failure from
        // here on still unmounts and deletes.
        let container = SourceContainer {
            id: id.to_owned(),
            runc_root: runc_root.clone(),
            rootfs: rootfs.clone(),
            upper: upper.clone(),
            cgroup_parent: cgroup_parent.clone(),
            output: Arc::new(Mutex::new(String::new())),
        };
        migrate_common::mount::mount_overlay(layers, &upper, &work, &rootfs).unwrap();
        sh(Command::new("runc").arg("spec").current_dir(&bundle));
        let config_path = bundle.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config["process"]["terminal"] = false.into();
        config["process"]["args"] = serde_json::json!(args);
        config["root"] = serde_json::json!({"path": rootfs, "readonly": false});
        config["linux"]["cgroupsPath"] = format!("/{cgroup_parent}/{id}").into();
        for (host, inside) in binds {
            config["mounts"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "destination": inside,
                    "type": "bind",
                    "source": host,
                    "options": ["rbind", "rw"],
                }));
        }
        std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();

        // stdout and stderr on one pipe the test reads, as under a logging
        // shim: a terminal or a host file could not be checkpointed.
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut run = self.hosts.on(&self.hosts.src, Path::new("runc"));
        run.arg("--root")
            .arg(&runc_root)
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end.try_clone().unwrap()))
            .stderr(Stdio::from(write_end));
        let status = run.status().unwrap();
        drop(run);
        assert!(status.success(), "runc run {id} failed: {status}");
        let output = container.output.clone();
        let mut pipe = std::fs::File::from(read_end);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        container
    }

    /// Runs `migrate` on the source host; returns its output.
    pub fn migrate(&self, container: &SourceContainer, extra: &[&str]) -> Output {
        self.migrate_command(container, extra).output().unwrap()
    }

    pub fn migrate_command(&self, container: &SourceContainer, extra: &[&str]) -> Command {
        self.migrate_command_of(&bin("migrate"), container, extra)
    }

    /// [`Lab::migrate_command`] with another build of `migrate`.
    pub fn migrate_command_of(
        &self,
        program: &Path,
        container: &SourceContainer,
        extra: &[&str],
    ) -> Command {
        let mut cmd = self.hosts.on(&self.hosts.src, program);
        cmd.arg(&container.id)
            .arg("--to")
            .arg(format!("{DST_ADDR}:{DST_PORT}"))
            .arg("--tls-dir")
            .arg(&self.tls_src)
            .arg("--runc-root")
            .arg(&container.runc_root)
            .arg("--work-dir")
            .arg(self.work_dir())
            .arg("--state-dir")
            .arg(self.source_state_dir())
            .arg("--json")
            .args(extra)
            .stdin(Stdio::null());
        cmd
    }

    /// `migrate resolve` for `container` on the source host.
    pub fn resolve_command(&self, container: &SourceContainer, extra: &[&str]) -> Command {
        self.resolve_command_in(container, &self.source_state_dir(), extra)
    }

    /// [`Lab::resolve_command`] with the records in `state_dir`.
    pub fn resolve_command_in(
        &self,
        container: &SourceContainer,
        state_dir: &Path,
        extra: &[&str],
    ) -> Command {
        let mut cmd = self.hosts.on(&self.hosts.src, &bin("migrate"));
        cmd.arg("resolve")
            .arg(&container.id)
            .arg("--tls-dir")
            .arg(&self.tls_src)
            .arg("--runc-root")
            .arg(&container.runc_root)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--json")
            .args(extra)
            .stdin(Stdio::null());
        cmd
    }

    /// Where the source keeps the migrations' records.
    pub fn source_state_dir(&self) -> PathBuf {
        self.path("src-state")
    }

    /// The phase in the source's record of a migration of `container_id`
    /// ("started", "decided", ...), if there is one.
    pub fn source_phase(&self, container_id: &str) -> Option<String> {
        let path = self
            .source_state_dir()
            .join("migrations")
            .join(format!("{container_id}.json"));
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        record["phase"].as_str().map(str::to_owned)
    }

    /// Puts a copy of the layer that lacks `missing` into the destination's
    /// layer store, under the real layer's digest: the destination then
    /// takes it for the layer, and a restore of a process holding `missing`
    /// open fails for real in CRIU.
    pub fn plant_layer_without(&self, missing: &str) {
        let digest = migrate_common::rootfs::digest::layer_digest(&self.layer).unwrap();
        let corrupt = self.path("dst-state").join("layers").join(digest.as_str());
        std::fs::create_dir_all(corrupt.parent().unwrap()).unwrap();
        sh(Command::new("cp").arg("-a").arg(&self.layer).arg(&corrupt));
        std::fs::remove_file(corrupt.join(missing)).unwrap();
    }

    /// The source's base for per-migration working dirs.
    pub fn work_dir(&self) -> PathBuf {
        self.path("src-work")
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

/// Copies `binary` into the layer's /bin with every shared library `ldd`
/// lists for it, each at its path on this host, so that it runs in a
/// busybox rootfs.
pub fn install_binary(layer: &Path, binary: &Path) {
    let name = binary.file_name().unwrap();
    std::fs::copy(binary, layer.join("bin").join(name)).unwrap();
    let listed = sh(Command::new("ldd").arg(binary));
    for lib in listed
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
    {
        let inside = layer.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        // copy follows symlinks: the layer gets the real file.
        std::fs::copy(lib, &inside).unwrap();
    }
}

pub fn make_busybox_rootfs(dir: &Path) {
    for sub in ["bin", "dev", "proc", "sys", "tmp", "etc", "root", "var"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let list = sh(Command::new("/bin/busybox").arg("--list"));
    for applet in list.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(dir.join("etc/game.conf"), "level=1\n").unwrap();
}

pub(crate) fn runc_delete(root: &Path, id: &str) {
    let _ = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["kill", id, "KILL"])
        .output();
    std::thread::sleep(Duration::from_millis(200));
    // Leftover criu-root mounts first: runc delete removes through them.
    unmount_under(&root.join(id));
    let _ = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["delete", "--force", id])
        .output();
}

pub(crate) fn remove_cgroup_parent(name: &str) {
    if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
        for ctl in controllers.flatten() {
            let _ = std::fs::remove_dir(ctl.path().join(name));
        }
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(name));
}

/// A container started on the source host.
#[derive(Debug)]
pub struct SourceContainer {
    pub id: String,
    pub runc_root: PathBuf,
    pub rootfs: PathBuf,
    pub upper: PathBuf,
    cgroup_parent: String,
    /// Everything the container wrote to stdout and stderr on the source.
    pub output: Arc<Mutex<String>>,
}

impl SourceContainer {
    pub fn state(&self) -> Option<serde_json::Value> {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["state", &self.id])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Whether the container's tasks are frozen (or being frozen), as the
    /// freezer cgroup (v1 or v2) or runc says.
    pub fn frozen(&self) -> bool {
        let v1 = Path::new("/sys/fs/cgroup/freezer")
            .join(&self.cgroup_parent)
            .join(&self.id)
            .join("freezer.state");
        let v2 = Path::new("/sys/fs/cgroup")
            .join(&self.cgroup_parent)
            .join(&self.id)
            .join("cgroup.events");
        let by_cgroup = std::fs::read_to_string(v1)
            .map(|s| s.trim() != "THAWED")
            .or_else(|_| std::fs::read_to_string(v2).map(|s| s.lines().any(|l| l == "frozen 1")))
            .unwrap_or(false);
        by_cgroup || self.state().is_some_and(|s| s["status"] == "paused")
    }

    pub fn pid(&self) -> Option<u64> {
        self.state()
            .filter(|s| s["status"] == "running")
            .and_then(|s| s["pid"].as_u64())
    }

    pub fn exec(&self, args: &[&str]) -> String {
        sh(Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .arg("exec")
            .arg(&self.id)
            .args(args))
    }
}

impl Drop for SourceContainer {
    fn drop(&mut self) {
        runc_delete(&self.runc_root, &self.id);
        unmount_under(&self.rootfs);
        remove_cgroup_parent(&self.cgroup_parent);
    }
}

/// Runs `args` in container `id` of runc root `root`.
pub fn runc_exec(root: &Path, id: &str, args: &[&str]) -> String {
    sh(Command::new("runc")
        .arg("--root")
        .arg(root)
        .arg("exec")
        .arg(id)
        .args(args))
}
