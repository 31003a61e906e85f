//! The `runc` binary: container state, checkpoint, restore, delete.
//!
//! Every call names the runc root explicitly, because a host may run several
//! runtimes' roots side by side (runc's default, containerd's, Docker's) and
//! because two test "hosts" sharing one kernel must not see each other's
//! containers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::criu::{log_tail, ConfigFile, LOG_TAIL_LINES};
use crate::process::{run, ToolError};

#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("container {id} not found in runc root {root}")]
    NotFound { id: String, root: PathBuf },
    #[error("cannot parse `runc state {id}` output")]
    State {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot parse `runc list` output of root {root}")]
    List {
        root: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("`runc restore` of {id} failed ({status})\nrunc: {runc_log}\nCRIU {criu_log}")]
    Restore {
        id: String,
        status: std::process::ExitStatus,
        runc_log: String,
        criu_log: String,
    },
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// What `runc state` reports.
#[derive(Debug, Clone, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub pid: u32,
    pub status: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
}

impl ContainerState {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }
}

fn parse_list(out: &str) -> Result<Vec<ContainerState>, serde_json::Error> {
    let listed: Option<Vec<ContainerState>> = serde_json::from_str(out)?;
    Ok(listed.unwrap_or_default())
}

/// Options that must be the same at checkpoint and at restore.
///
/// Whatever they say, a dump checkpoints established TCP connections (CRIU
/// refuses to dump a container with one otherwise) and skips in-flight ones
/// (connections still in a listener's accept queue, which CRIU refuses
/// too): a server under client load can always move, and its clients see at
/// worst a reset. Established connections are then restored closed unless
/// `tcp_established` asks to keep them open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CriuOptions {
    /// Restore established TCP connections open (CRIU `--tcp-established`
    /// at restore too): only useful when the container's address moves with
    /// it.
    pub tcp_established: bool,
    /// Checkpoint file locks (CRIU `--file-locks`): flock and fcntl locks,
    /// as databases hold.
    pub file_locks: bool,
    /// Link files open under a name since unlinked, but still linked
    /// elsewhere, back into the rootfs (CRIU `--link-remap`).
    pub link_remap: bool,
    /// Allow unix sockets connected to peers outside the container (CRIU
    /// `--ext-unix-sk`).
    pub ext_unix_sk: bool,
}

/// A CRIU option name in a `Hello` that this side does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("CRIU option {0:?} is not one migrate passes (known: file-locks, link-remap, ext-unix-sk)")]
pub struct UnknownCriuOption(pub String);

impl CriuOptions {
    /// The options besides `tcp_established`, by their CRIU names, for the
    /// `Hello`.
    pub fn names(&self) -> Vec<String> {
        [
            (self.file_locks, FILE_LOCKS),
            (self.link_remap, LINK_REMAP),
            (self.ext_unix_sk, EXT_UNIX_SK),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| name.to_owned())
        .collect()
    }

    /// The options a `Hello` carries, checked: a peer could send anything.
    pub fn from_names(tcp_established: bool, names: &[String]) -> Result<Self, UnknownCriuOption> {
        let mut options = Self {
            tcp_established,
            ..Self::default()
        };
        for name in names {
            match name.as_str() {
                FILE_LOCKS => options.file_locks = true,
                LINK_REMAP => options.link_remap = true,
                EXT_UNIX_SK => options.ext_unix_sk = true,
                _ => return Err(UnknownCriuOption(name.clone())),
            }
        }
        Ok(options)
    }

    /// The runc flags of a checkpoint. runc sends these to CRIU explicitly,
    /// false included, so they cannot go through the config file.
    fn checkpoint_args(&self) -> Vec<&'static str> {
        let mut args = vec!["--tcp-established"];
        args.extend(self.shared_args());
        args
    }

    fn restore_args(&self) -> Vec<&'static str> {
        let mut args = Vec::new();
        if self.tcp_established {
            args.push("--tcp-established");
        }
        args.extend(self.shared_args());
        args
    }

    fn shared_args(&self) -> Vec<&'static str> {
        let mut args = Vec::new();
        if self.file_locks {
            args.push("--file-locks");
        }
        if self.ext_unix_sk {
            args.push("--ext-unix-sk");
        }
        args
    }

    /// What a dump's CRIU config file carries for these options: those runc
    /// has no flag for.
    pub fn apply_to_dump(&self, config: &mut ConfigFile) {
        config.skip_in_flight = true;
        config.link_remap = self.link_remap;
    }

    /// What a restore's CRIU config file carries for these options.
    pub fn apply_to_restore(&self, config: &mut ConfigFile) {
        config.tcp_close = !self.tcp_established;
    }
}

const FILE_LOCKS: &str = "file-locks";
const LINK_REMAP: &str = "link-remap";
const EXT_UNIX_SK: &str = "ext-unix-sk";

/// Which of CRIU's dumps a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpKind {
    /// `--pre-dump`: memory only, the container keeps running (pre-copy).
    PreDump,
    /// A full dump; the container ends frozen in CRIU's post-dump action.
    Final,
    /// `--lazy-pages`: everything but memory, which CRIU then serves on its
    /// page-server socket until the destination has it all (post-copy).
    Lazy,
}

/// What `runc checkpoint` needs to know.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointSpec<'a> {
    pub id: &'a str,
    pub kind: DumpKind,
    pub image_dir: &'a Path,
    pub work_dir: &'a Path,
    /// The previous round's image dir, relative to `image_dir` (CRIU
    /// resolves it from there and records it as the `parent` link).
    pub parent: Option<&'a Path>,
    /// The file `CRIU_CONFIG_FILE` names.
    pub criu_config: &'a Path,
    pub options: CriuOptions,
}

/// What `runc restore` needs to know.
#[derive(Debug, Clone, Copy)]
pub struct RestoreSpec<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    pub image_dir: &'a Path,
    /// CRIU's work dir: its restore.log ends up here.
    pub work_dir: &'a Path,
    /// Where runc writes its own messages.
    pub runc_log: &'a Path,
    /// Memory comes from a lazy-pages daemon listening in `work_dir`.
    pub lazy: bool,
    /// The file `CRIU_CONFIG_FILE` names, if any.
    pub criu_config: Option<&'a Path>,
    pub options: CriuOptions,
}

/// One runc root, driven through one runc binary.
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    pub root: PathBuf,
    /// CRIU binary runc should use; runc looks up `criu` in PATH otherwise.
    pub criu: Option<PathBuf>,
}

impl Runc {
    pub fn new(
        binary: impl Into<PathBuf>,
        root: impl Into<PathBuf>,
        criu: Option<PathBuf>,
    ) -> Self {
        Self {
            binary: binary.into(),
            root: root.into(),
            criu,
        }
    }

    fn command(&self) -> Command {
        self.command_logging_to(None)
    }

    /// runc takes its global options (root, criu, log) before the
    /// subcommand only.
    fn command_logging_to(&self, log: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        if let Some(log) = log {
            cmd.arg("--log").arg(log);
        }
        if let Some(criu) = &self.criu {
            cmd.arg("--criu").arg(criu);
        }
        cmd
    }

    pub fn version(&self) -> Result<String, RuncError> {
        let out = run(Command::new(&self.binary).arg("--version"))?;
        Ok(out.lines().next().unwrap_or_default().trim().to_owned())
    }

    /// The container's state, or [`RuncError::NotFound`].
    pub fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        if !self.root.join(id).join("state.json").exists() {
            return Err(RuncError::NotFound {
                id: id.to_owned(),
                root: self.root.clone(),
            });
        }
        let out = run(self.command().args(["state", id]))?;
        serde_json::from_str(&out).map_err(|source| RuncError::State {
            id: id.to_owned(),
            source,
        })
    }

    /// Every container of the root, in `runc list` order. A root that does
    /// not exist yet holds none (runc prints `null` for it).
    pub fn list(&self) -> Result<Vec<ContainerState>, RuncError> {
        if !self.root.exists() {
            return Ok(Vec::new());
        }
        let out = run(self.command().args(["list", "--format", "json"]))?;
        parse_list(&out).map_err(|source| RuncError::List {
            root: self.root.clone(),
            source,
        })
    }

    pub fn exists(&self, id: &str) -> bool {
        self.root.join(id).join("state.json").exists()
    }

    /// The directory where runc keeps the container's state; runc mounts its
    /// `criu-root` here during restore.
    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// A `runc checkpoint` command, for the caller to spawn: a final dump
    /// blocks in CRIU's post-dump action and a lazy one serves pages until the
    /// migration's outcome is known, so the caller must be able to wait for
    /// it and for the hook or the page relay at once. It runs in its own
    /// process group so that a Ctrl-C at the terminal reaches only us, and we
    /// decide what CRIU does.
    pub fn checkpoint_command(&self, spec: &CheckpointSpec<'_>) -> Command {
        let mut cmd = self.command();
        cmd.arg("checkpoint");
        match spec.kind {
            DumpKind::PreDump => {
                cmd.arg("--pre-dump");
            }
            DumpKind::Final => {}
            DumpKind::Lazy => {
                cmd.arg("--lazy-pages");
            }
        }
        cmd.arg("--image-path")
            .arg(spec.image_dir)
            .arg("--work-path")
            .arg(spec.work_dir);
        if let Some(parent) = spec.parent {
            cmd.arg("--parent-path").arg(parent);
        }
        cmd.args(spec.options.checkpoint_args())
            .arg(spec.id)
            .env("CRIU_CONFIG_FILE", spec.criu_config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// `runc pause`: freezes the container's cgroup.
    pub fn pause(&self, id: &str) -> Result<(), RuncError> {
        run(self.command().args(["pause", id]))?;
        Ok(())
    }

    /// `runc resume`: thaws it.
    pub fn resume(&self, id: &str) -> Result<(), RuncError> {
        run(self.command().args(["resume", id]))?;
        Ok(())
    }

    /// A `runc restore -d` command as `spec` says, for the caller to spawn:
    /// with a hold at CRIU's post-restore action it returns only once the
    /// hold is lifted. The restored processes' stdout and stderr become
    /// `stdout` and `stderr` where they were pipes at checkpoint time (runc
    /// maps them through CRIU's inherit-fd). It runs in its own process
    /// group, so that a signal meant for the agent does not end a restore
    /// that must outlive it.
    pub fn restore_command(&self, spec: &RestoreSpec<'_>, stdout: Stdio, stderr: Stdio) -> Command {
        let mut cmd = self.command_logging_to(Some(spec.runc_log));
        cmd.arg("restore")
            .arg("--detach")
            .arg("--bundle")
            .arg(spec.bundle)
            .arg("--image-path")
            .arg(spec.image_dir)
            .arg("--work-path")
            .arg(spec.work_dir);
        if spec.lazy {
            cmd.arg("--lazy-pages");
        }
        if let Some(config) = spec.criu_config {
            cmd.env("CRIU_CONFIG_FILE", config);
        }
        cmd.args(spec.options.restore_args())
            .arg(spec.id)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// runc's error lines and CRIU's log tail for a failed restore, from
    /// runc's log and CRIU's restore log.
    pub fn restore_failure_logs(runc_log: &Path, criu_log: &Path) -> (String, String) {
        (runc_errors(runc_log), log_tail(criu_log, LOG_TAIL_LINES))
    }

    /// `runc delete --force`. Callers must unmount leftovers under
    /// [`Runc::state_dir`] first: runc removes that directory recursively,
    /// and through a leftover `criu-root` bind mount that means the
    /// container's rootfs.
    pub fn delete_force(&self, id: &str) -> Result<(), RuncError> {
        run(self.command().args(["delete", "--force", id]))?;
        Ok(())
    }
}

/// runc's own error lines from its log (it also logs retries and warnings
/// that do not explain a failure), without the logfmt time prefix.
fn runc_errors(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => error_lines(&text),
        Err(e) => format!("no runc log at {} ({e})", path.display()),
    }
}

fn error_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("level=error") || l.contains("level=fatal"))
        .map(|l| match l.find("msg=") {
            Some(at) => &l[at + 4..],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn runc_list_output_is_read() {
        assert!(parse_list("null").unwrap().is_empty());
        let listed = parse_list(
            r#"[{"ociVersion":"1.0.2","id":"web1","pid":42,"status":"running",
                "bundle":"/b/web1","rootfs":"/b/web1/rootfs","created":"2026-12-02T06:00:00Z",
                "owner":"root"},
               {"ociVersion":"1.0.2","id":"db","pid":0,"status":"stopped",
                "bundle":"/b/db","rootfs":"/b/db/rootfs","created":"2026-12-02T06:00:00Z",
                "owner":"root"}]"#,
        )
        .unwrap();
        let ids: Vec<_> = listed
            .iter()
            .map(|c| (c.id.as_str(), c.is_running()))
            .collect();
        assert_eq!(ids, [("web1", true), ("db", false)]);
        assert!(parse_list("[{\"id\": 1}]").is_err());
    }

    #[test]
    fn parses_runc_state() {
        let json = r#"{"ociVersion":"1.0.2-dev","id":"c1","pid":9986,"status":"running",
            "bundle":"/b","rootfs":"/b/rootfs","created":"2026-11-29T02:07:10Z","owner":""}"#;
        let st: ContainerState = serde_json::from_str(json).unwrap();
        assert_eq!(st.pid, 9986);
        assert!(st.is_running());
        assert_eq!(st.rootfs, PathBuf::from("/b/rootfs"));
    }

    #[test]
    fn checkpoint_passes_config_through_the_environment() {
        let runc = Runc::new("runc", "/run/r", Some("/usr/local/sbin/criu".into()));
        let mut spec = CheckpointSpec {
            id: "c1",
            kind: DumpKind::Final,
            image_dir: Path::new("/w/img"),
            work_dir: Path::new("/w/work"),
            parent: None,
            criu_config: Path::new("/w/criu.conf"),
            options: CriuOptions {
                file_locks: true,
                ..CriuOptions::default()
            },
        };
        let cmd = runc.checkpoint_command(&spec);
        let line = crate::process::describe(&cmd);
        assert_eq!(
            line,
            "runc --root /run/r --criu /usr/local/sbin/criu checkpoint --image-path /w/img \
             --work-path /w/work --tcp-established --file-locks c1"
        );
        spec.kind = DumpKind::PreDump;
        spec.parent = Some(Path::new("../1"));
        assert!(
            crate::process::describe(&runc.checkpoint_command(&spec)).contains(
                "checkpoint --pre-dump --image-path /w/img --work-path /w/work --parent-path ../1"
            )
        );
        spec.kind = DumpKind::Lazy;
        assert!(crate::process::describe(&runc.checkpoint_command(&spec))
            .contains("checkpoint --lazy-pages --image-path"));
        let env: Vec<_> = cmd.get_envs().collect();
        assert_eq!(
            env,
            [(
                std::ffi::OsStr::new("CRIU_CONFIG_FILE"),
                Some(std::ffi::OsStr::new("/w/criu.conf"))
            )]
        );
    }

    #[test]
    fn restore_keeps_connections_open_only_when_asked() {
        let runc = Runc::new("runc", "/run/r", None);
        let restore = |options| {
            let spec = RestoreSpec {
                id: "c1",
                bundle: Path::new("/b"),
                image_dir: Path::new("/i"),
                work_dir: Path::new("/w"),
                runc_log: Path::new("/l"),
                lazy: false,
                criu_config: None,
                options,
            };
            crate::process::describe(&runc.restore_command(&spec, Stdio::null(), Stdio::null()))
        };
        let mut config = ConfigFile::default();
        let closed = CriuOptions {
            ext_unix_sk: true,
            ..CriuOptions::default()
        };
        assert!(restore(closed).ends_with("--work-path /w --ext-unix-sk c1"));
        closed.apply_to_restore(&mut config);
        assert!(config.tcp_close);
        let open = CriuOptions {
            tcp_established: true,
            ..CriuOptions::default()
        };
        assert!(restore(open).ends_with("--work-path /w --tcp-established c1"));
        open.apply_to_restore(&mut config);
        assert!(!config.tcp_close);
    }

    #[test]
    fn dumps_always_skip_in_flight_connections() {
        let mut config = ConfigFile::default();
        CriuOptions::default().apply_to_dump(&mut config);
        assert!(config.skip_in_flight && !config.link_remap);
        CriuOptions {
            link_remap: true,
            ..CriuOptions::default()
        }
        .apply_to_dump(&mut config);
        assert!(config.link_remap);
    }

    #[test]
    fn options_cross_by_name_and_unknown_names_are_refused() {
        let all = CriuOptions {
            tcp_established: true,
            file_locks: true,
            link_remap: true,
            ext_unix_sk: true,
        };
        assert_eq!(all.names(), ["file-locks", "link-remap", "ext-unix-sk"]);
        assert_eq!(CriuOptions::from_names(true, &all.names()), Ok(all));
        assert_eq!(
            CriuOptions::from_names(false, &[]),
            Ok(CriuOptions::default())
        );
        let forged = ["file-locks".to_owned(), "action-script=/tmp/x".to_owned()];
        assert_eq!(
            CriuOptions::from_names(false, &forged),
            Err(UnknownCriuOption("action-script=/tmp/x".into()))
        );
    }

    #[test]
    fn keeps_only_runc_error_lines() {
        let log = "time=\"t\" level=warning msg=\"Failed to remove cgroup (will retry)\"\n\
                   time=\"t\" level=error msg=\"criu failed: type NOTIFY errno 0\"\n";
        assert_eq!(error_lines(log), "\"criu failed: type NOTIFY errno 0\"");
    }

    #[test]
    fn missing_container_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let runc = Runc::new("runc", dir.path(), None);
        assert!(matches!(
            runc.state("nope"),
            Err(RuncError::NotFound { .. })
        ));
    }
}
