//! `migrate-dst`: the destination daemon of live container migrations.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use migrate_common::certs::TlsDir;
use migrate_common::criu::Criu;
use migrate_common::policy::Policy;
use migrate_common::runc::Runc;
use migrate_dst::images::ImageDir;
use migrate_dst::Daemon;
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "migrate-dst",
    version,
    about = "Receive and restore live-migrated runc containers",
    after_help = "Example:\n  \
                  migrate-dst --listen 0.0.0.0:7070 --allow src.example --state-dir /var/lib/migrate-dst\n\n\
                  Under systemd, see contrib/systemd/migrate-dst.service: KillMode=process, so that \
                  stopping the daemon leaves held copies' restores and hooks to the next run.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
struct DaemonArgs {
    /// Address to listen on (UDP), e.g. 0.0.0.0:7070.
    #[arg(long, required = true)]
    listen: Option<SocketAddr>,
    /// Directory with ca.pem, cert.pem and key.pem (see `migrate certs`).
    #[arg(long, default_value = "/etc/migrate/tls")]
    tls_dir: PathBuf,
    /// Where layers and restored containers' files live (on disk: they must
    /// survive a crash).
    #[arg(long, default_value = "/var/lib/migrate-dst")]
    state_dir: PathBuf,
    /// Where received CRIU images are held until their restore ends: a
    /// tmpfs (refused otherwise), so that the restore reads memory from
    /// memory. It needs room for the memory of the containers received at
    /// once. One per daemon: at start, a daemon removes what it finds there
    /// that none of its held copies needs.
    #[arg(long, value_name = "DIR", default_value = migrate_dst::images::DEFAULT_IMAGE_DIR)]
    image_dir: PathBuf,
    /// runc root to register restored containers in.
    #[arg(long, default_value = "/run/runc")]
    runc_root: PathBuf,
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    #[arg(long, default_value = "criu")]
    criu: PathBuf,
    /// Cgroup parent for restored containers (cgroupfs path, e.g. /migrate);
    /// by default they keep the source's cgroupsPath.
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// Seconds without its source after which a held copy is reported in
    /// doubt (in the log and in `status`). Only a report: a held copy is
    /// released or discarded only when its source says so.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    in_doubt_after: u64,
    /// Migrations received at once; more are refused at their preflight
    /// (their containers keep running on their sources). Each takes room
    /// in the image dir for its images and memory for its streams.
    #[arg(long, value_name = "N", default_value_t = migrate_dst::DEFAULT_MAX_MIGRATIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    max_migrations: u64,
    /// A source that may push containers here: a name its certificate
    /// carries (its `migrate certs issue --name`). Repeatable; without any,
    /// every migration is refused.
    #[arg(long = "allow", value_name = "NAME")]
    allow: Vec<String>,
    /// A host directory containers may bind-mount from (it and everything
    /// below it). Repeatable; by default containers may bind-mount nothing.
    #[arg(long = "allow-bind", value_name = "DIR")]
    allow_bind: Vec<PathBuf>,
    /// A host bridge moved containers' interfaces may join (a container
    /// that was on a bridge on its source gets a port on this host's bridge
    /// of the same name). Repeatable; by default none may.
    #[arg(long = "allow-bridge", value_name = "BRIDGE")]
    allow_bridge: Vec<String>,
    /// Accept containers that ask for more than `runc spec` gives
    /// (capabilities, host namespaces, devices, sysctls, writable /proc and
    /// /sys paths, hooks...) and bind mounts from anywhere. Hooks from the
    /// source are dropped all the same.
    #[arg(long)]
    allow_privileged: bool,
    /// Most bytes the layer store may hold (e.g. 20GiB, 500MB); past it,
    /// layers no container uses are removed, least recently used first, at
    /// start and after each migration. Layers in use always stay.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    layer_store_max: Option<u64>,
    /// Remove layers no container uses once no migration used them for
    /// this long (e.g. 7d, 12h), at start and after each migration.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    layer_max_age: Option<Duration>,
}

/// A size as people write it: 20GiB, 500MB, 1048576.
fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>().map(|size| size.as_u64())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// OCI createRuntime hook run by runc during restore; not for users.
    #[command(hide = true)]
    NetworkHook {
        /// The container's network identity (written at prepare) to
        /// recreate in its namespace; without it only loopback comes up.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The host's end of each interface, by the identity's order.
        #[arg(long = "host-end")]
        host_ends: Vec<String>,
    },
    /// Appends stdin to FILE until EOF: a restored container's stdio sink.
    #[command(hide = true)]
    LogShim { file: PathBuf },
    /// Called by CRIU's action script during a restore; not for users.
    #[command(hide = true)]
    CriuActionHook { socket: PathBuf },
    /// Print a completion script for SHELL to stdout.
    #[command(
        after_help = "Example:\n  migrate-dst completions bash > /usr/share/bash-completion/completions/migrate-dst"
    )]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout, or write it and one page per
    /// subcommand into a directory.
    #[command(
        after_help = "Examples:\n  migrate-dst man > /usr/share/man/man1/migrate-dst.1\n  migrate-dst man --dir /usr/share/man/man1"
    )]
    Man {
        /// Write migrate-dst.1 and migrate-dst-<subcommand>.1 into DIR.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// The containers this host received and still holds, or runs without
    /// its source's final word, with their phase.
    #[command(
        after_help = "Examples:\n  migrate-dst status\n  migrate-dst status --in-doubt-after 300 --json"
    )]
    Status {
        #[arg(long, default_value = "/var/lib/migrate-dst")]
        state_dir: PathBuf,
        /// Held longer than this (seconds) is reported in doubt.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        in_doubt_after: u64,
        /// Print one JSON object on stdout, the entries under `containers`
        /// (or the error), with `version`, the version of its schema.
        #[arg(long)]
        json: bool,
    },
    /// Remove the layers no container here uses from the layer store (or,
    /// with a limit, only those beyond it). Safe while the daemon runs.
    #[command(after_help = "Examples:\n  migrate-dst gc --dry-run\n  \
                            migrate-dst gc --layer-store-max 20GiB --layer-max-age 7d --json")]
    Gc {
        #[arg(long, default_value = "/var/lib/migrate-dst")]
        state_dir: PathBuf,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only what is beyond this size, least recently used first.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        layer_store_max: Option<u64>,
        /// Only what no migration used for this long.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        layer_max_age: Option<Duration>,
        /// Print what was removed (or the error) as one JSON object on
        /// stdout, with `version`, the version of its schema.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::NetworkHook {
            identity,
            host_ends,
        }) => network_hook(identity.as_deref(), &host_ends),
        Some(Command::LogShim { file }) => log_shim(&file),
        Some(Command::CriuActionHook { socket }) => {
            use migrate_common::hook::{run_action_hook, AgentGone, ACTION_ENV, POST_RESTORE};
            let action = std::env::var(ACTION_ENV).unwrap_or_default();
            let code = run_action_hook(&socket, &action, POST_RESTORE, &AgentGone::WaitForAgent);
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
        Some(Command::Completions { shell }) => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "migrate-dst", &mut std::io::stdout());
            Ok(())
        }
        Some(Command::Man { dir }) => man_pages(dir.as_deref()),
        Some(Command::Status {
            state_dir,
            in_doubt_after,
            json,
        }) => {
            let result = status(&state_dir, Duration::from_secs(in_doubt_after), json);
            if let (Err(e), true) = (&result, json) {
                println!("{}", migrate_common::json::error(&format!("{e:#}")));
            }
            result
        }
        Some(Command::Gc {
            state_dir,
            dry_run,
            layer_store_max,
            layer_max_age,
            json,
        }) => {
            let limits = migrate_dst::gc::Limits {
                max_bytes: layer_store_max,
                max_age: layer_max_age,
            };
            let result = gc(&state_dir, &limits, dry_run, json);
            if let (Err(e), true) = (&result, json) {
                println!("{}", migrate_common::json::error(&format!("{e:#}")));
            }
            result
        }
        None => run_daemon(cli.daemon),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate-dst: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn network_hook(identity: Option<&std::path::Path>, host_ends: &[String]) -> anyhow::Result<()> {
    let state = migrate_common::netns::read_hook_state(std::io::stdin())?;
    // From the host's namespace, before loopback's setns leaves it.
    if let Some(path) = identity {
        migrate_dst::network::recreate_in_hook(path, state.pid, host_ends)?;
    }
    migrate_common::netns::bring_up_loopback(state.pid)?;
    Ok(())
}

fn log_shim(file: &PathBuf) -> anyhow::Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    let mut input = std::io::stdin().lock();
    std::io::copy(&mut input, &mut out).context("copying container output")?;
    out.flush()?;
    Ok(())
}

fn status(state_dir: &std::path::Path, in_doubt_after: Duration, json: bool) -> anyhow::Result<()> {
    let entries = migrate_dst::restart::status(state_dir, in_doubt_after)?;
    if json {
        let report = serde_json::json!({ "containers": entries });
        println!("{}", migrate_common::json::versioned(&report)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no container is held or awaiting its source here");
    }
    for entry in entries {
        println!("{}", entry.line());
    }
    Ok(())
}

fn gc(
    state_dir: &std::path::Path,
    limits: &migrate_dst::gc::Limits,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let store = migrate_dst::store::LayerStore::open(state_dir.join("layers"))?;
    let report = migrate_dst::gc::collect(&store, state_dir, limits, dry_run)?;
    if json {
        println!("{}", migrate_common::json::versioned(&report)?);
    } else {
        for line in report.lines() {
            println!("{line}");
        }
    }
    Ok(())
}

fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIGRATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs go to files and journals.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let listen = args.listen.context("--listen is required")?;
    let tls = TlsDir::load(&args.tls_dir).context("loading TLS material")?;
    let policy = policy(&args)?;
    let images = ImageDir::open(&args.image_dir)?;
    let mut daemon = Daemon::new(
        args.state_dir,
        images,
        Runc::new(args.runc, args.runc_root, Some(args.criu.clone())),
        Criu::new(args.criu),
        args.cgroup_parent,
        policy,
    )?;
    daemon.in_doubt_after = Duration::from_secs(args.in_doubt_after);
    daemon.max_migrations = usize::try_from(args.max_migrations)?;
    daemon.layer_limits = migrate_dst::gc::Limits {
        max_bytes: args.layer_store_max,
        max_age: args.layer_max_age,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(migrate_dst::serve(listen, &tls, daemon))
}

/// The policy the flags ask for, said in the log at start.
fn policy(args: &DaemonArgs) -> anyhow::Result<Policy> {
    let mut bind_roots = Vec::new();
    for dir in &args.allow_bind {
        // Sources are matched as written and as they resolve, so both
        // forms of a directory reached through a symlink count.
        let real = std::fs::canonicalize(dir)
            .with_context(|| format!("--allow-bind {}", dir.display()))?;
        bind_roots.push(dir.clone());
        if real != *dir {
            bind_roots.push(real);
        }
    }
    let policy = Policy::new(&args.allow, bind_roots, args.allow_privileged)?
        .with_bridges(&args.allow_bridge);
    if policy.allows_no_source() {
        warn!(
            "no source may migrate containers here: every migration will be refused; \
             allow sources with --allow <name in the source's certificate>"
        );
    } else {
        info!(
            sources = args.allow.join(", "),
            "sources allowed to migrate containers here"
        );
    }
    info!(
        bind = policy.bind_roots_text(),
        bridges = policy.bridges_text(),
        privileged = args.allow_privileged,
        "what received containers may use"
    );
    if args.allow_privileged {
        warn!("--allow-privileged: received containers may have every privilege their config asks for");
    }
    Ok(policy)
}

/// `migrate-dst man`: the page on stdout, or every page into `dir`.
fn man_pages(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    match dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), dir)
            .with_context(|| format!("writing the man pages into {}", dir.display())),
        None => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .context("writing the man page"),
    }
}

#[cfg(test)]
mod cli_tests;
