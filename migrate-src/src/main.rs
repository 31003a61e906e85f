//! `migrate`: live-migrate a runc container to another host, and manage the
//! certificates both hosts use. Parses arguments and hands over to the
//! `migrate_src` library.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use migrate_common::criu::Criu;
use migrate_common::runc::{CriuOptions, Runc};
use migrate_common::transfer::compression::CompressionChoice;
use migrate_src::mode::RequestedMode;
use migrate_src::progress::Reporter;
use migrate_src::{MigrateOptions, MigrationError};

#[derive(Debug, Parser)]
#[command(
    name = "migrate",
    version,
    about = "Live-migrate a running runc container to another host",
    after_help = "Exit status: 0 the container runs on the destination only; 1 the migration failed and \
                  the container runs on the source as before; 2 usage error; 3 in doubt: the source decided \
                  but could not finish (a copy is held, nothing runs twice), see `migrate resolve`; 4 lost: \
                  no copy runs (must never happen; said if it does).\n\n\
                  Subcommand names win over container ids: a container named like a subcommand \
                  (ps, check, drain, status, cancel, resolve, certs, ...) is given after `--`.\n\n\
                  Examples:\n  \
                  migrate web1 --to dst.example:7070\n  \
                  migrate web1 --to dst.example:7070 --mode post-copy --json\n  \
                  migrate -- resolve --to dst.example:7070   (a container named `resolve`)",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    migrate: MigrateArgs,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// The container's id in the runc root.
    #[arg(required = true)]
    container_id: Option<String>,
    /// Destination daemon, host:port; host must match its certificate.
    #[arg(long, required = true, value_name = "HOST:PORT")]
    to: Option<String>,
    #[command(flatten)]
    settings: MigrationSettings,
}

/// How a migration runs, whichever container it moves where: a single
/// migration's options, and each of a drain's.
#[derive(Debug, Args)]
struct MigrationSettings {
    /// Directory with ca.pem, cert.pem and key.pem (see `migrate certs`).
    #[arg(long, default_value = "/etc/migrate/tls")]
    tls_dir: PathBuf,
    /// runc root holding the container (containerd: /run/containerd/runc/<namespace>).
    #[arg(long, default_value = "/run/runc")]
    runc_root: PathBuf,
    /// runc binary.
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// CRIU binary (passed on to runc).
    #[arg(long, default_value = "criu")]
    criu: PathBuf,
    /// Where checkpoint images are written; should be tmpfs.
    #[arg(long, default_value = "/dev/shm/migrate")]
    work_dir: PathBuf,
    /// Where each migration's record (its decision) is kept; must be on a
    /// disk that survives a reboot, not tmpfs.
    #[arg(long, default_value = "/var/lib/migrate")]
    state_dir: PathBuf,
    /// How memory moves (auto: pre-copy where this host can, else
    /// stop-and-copy; never post-copy).
    ///
    /// auto: pre-copy where this host tracks dirty memory,
    /// else stop-and-copy (never post-copy). pre-copy: pre-dump rounds while
    /// the container runs, then a short frozen dump. post-copy: frozen only
    /// for the dump of everything but memory; the container runs on the
    /// destination at once and its memory follows — if the destination or
    /// the link fails for longer than --resume-timeout while memory is still
    /// here, the migration is in doubt (exit 3): both copies stay held and an
    /// operator decides. hybrid: pre-copy rounds, then post-copy.
    #[arg(long, value_enum, default_value_t = RequestedMode::Auto)]
    mode: RequestedMode,
    /// Pre-copy's downtime target in milliseconds: freeze once the predicted
    /// frozen step fits.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    max_downtime: u64,
    /// Most pre-copy rounds before freezing anyway.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    max_rounds: u32,
    /// Longest the container may stay frozen before the destination has
    /// everything it needs to restore it, in seconds; then it resumes here.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    freeze_timeout: u64,
    /// Seconds of silence after which the link counts as lost.
    #[arg(long, value_name = "SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..))]
    link_timeout: u64,
    /// Post-copy: seconds to reconnect a lost link before the migration is
    /// in doubt.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    resume_timeout: u64,
    /// Bytes of deleted-but-mapped files CRIU may copy into the images.
    #[arg(long, default_value_t = 64 << 20)]
    ghost_limit: u64,
    /// Whether the frozen step's data is compressed.
    ///
    /// auto: zstd when the link is slower than this host compresses (both
    /// measured before the freeze), else not; zstd where the link's rate is
    /// unknown. none: nothing is compressed. zstd: everything is.
    #[arg(long, value_enum, default_value_t = CompressionArg::Auto)]
    compression: CompressionArg,
    /// Most bytes per second the migration's data streams put on the link
    /// (after compression): 100MiB, 125M (powers of 1000), 1Gbit (bits).
    #[arg(long, value_name = "RATE", value_parser = migrate_src::bandwidth::parse_rate)]
    max_bandwidth: Option<u64>,
    /// Keep established TCP connections open across the move; only useful
    /// when the container's address moves with it. Without it they are
    /// restored closed (their clients see a reset), and connections not yet
    /// accepted are always left behind.
    #[arg(long)]
    tcp_established: bool,
    /// Move flock and fcntl file locks (databases hold them); without it
    /// CRIU refuses a container holding one.
    #[arg(long)]
    file_locks: bool,
    /// Move files open under a name since removed but still linked elsewhere,
    /// by linking them back into the rootfs during the dump.
    #[arg(long)]
    link_remap: bool,
    /// Allow unix sockets connected to peers outside the container (CRIU
    /// `--ext-unix-sk`).
    #[arg(long)]
    ext_unix_sk: bool,
    /// Print the summary (or the error) as one JSON object on stdout, with
    /// `version`, the version of its schema.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and issue TLS certificates.
    #[command(
        subcommand,
        after_help = "Example:\n  migrate certs ca --out /root/migrate-ca"
    )]
    Certs(CertsCommand),
    /// Settle a migration that stopped before both hosts settled (in doubt,
    /// interrupted, or its `migrate` killed), from this host's record.
    ///
    /// No decision recorded: the destination discards its copy and the
    /// container runs here. Decision recorded: the destination's copy is
    /// released (post-copy: only --go-back is possible). No record: says what
    /// each host holds. Exit status as for a migration.
    #[command(after_help = "Examples:\n  \
                            migrate resolve web1\n  \
                            migrate resolve web1 --to dst.example:7070 --json\n  \
                            migrate resolve web1 --go-back")]
    Resolve(ResolveArgs),
    /// Ask destinations whether they would take containers, and why not:
    /// the preflight alone, a verdict per item (versions, CRIU features,
    /// CPU, disk, image space, memory, layers, bind sources, cgroup,
    /// policy). Nothing is frozen or claimed.
    #[command(
        after_help = "Exit status: 0 every container would move to every destination; 1 \
                            some would not, or could not be checked.\n\n\
                            Examples:\n  \
                            migrate check web1 --to dst.example:7070\n  \
                            migrate check --to dst1.example:7070 --to dst2.example:7070 --json   \
                            (every running container)"
    )]
    Check(cli_check::CheckArgs),
    /// Move every running container of the runc root (or those --filter
    /// keeps) to the destinations given.
    #[command(after_help = cli_drain::DRAIN_AFTER_HELP)]
    Drain(cli_drain::DrainArgs),
    /// The containers of the runc root: state, memory, upper dir size, and
    /// whether each could be live-migrated now, and why not.
    #[command(after_help = cli_inventory::PS_EXAMPLES)]
    Ps(cli_inventory::PsArgs),
    /// The migrations this host's records know of: in progress, in doubt,
    /// interrupted, each with the `migrate resolve` that settles it.
    #[command(after_help = cli_inventory::STATUS_EXAMPLES)]
    Status(cli_inventory::StatusArgs),
    /// End one migration at a safe point (it rolls back before its
    /// decision and finishes after it, as on Ctrl-C), or stop a drain from
    /// starting more.
    #[command(after_help = cli_inventory::CANCEL_EXAMPLES)]
    Cancel(cli_inventory::CancelArgs),
    /// Print a completion script for SHELL to stdout.
    #[command(
        after_help = "Example:\n  migrate completions bash > /usr/share/bash-completion/completions/migrate"
    )]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout, or write it and one page per
    /// subcommand into a directory.
    #[command(
        after_help = "Examples:\n  migrate man > /usr/share/man/man1/migrate.1\n  migrate man --dir /usr/share/man/man1"
    )]
    Man {
        /// Write migrate.1 and migrate-<subcommand>.1 into DIR.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Called by CRIU's action script during a checkpoint; not for users.
    #[command(hide = true)]
    CriuActionHook {
        socket: PathBuf,
        /// The migration's record, read when the agent is gone.
        #[arg(long)]
        record: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ResolveArgs {
    container_id: String,
    /// The destination, if not the one in the record.
    #[arg(long, value_name = "HOST:PORT")]
    to: Option<String>,
    /// Post-copy after the decision: discard the destination's copy and
    /// resume the original here, losing what the copy did since the freeze.
    #[arg(long)]
    go_back: bool,
    #[arg(long, default_value = "/etc/migrate/tls")]
    tls_dir: PathBuf,
    #[arg(long, default_value = "/run/runc")]
    runc_root: PathBuf,
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    #[arg(long, default_value = "criu")]
    criu: PathBuf,
    #[arg(long, default_value = "/var/lib/migrate")]
    state_dir: PathBuf,
    /// Print the outcome (or the error) as one JSON object on stdout, with
    /// `version`, the version of its schema.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a certificate authority: ca.pem and ca-key.pem.
    #[command(after_help = "Example:\n  migrate certs ca --out /root/migrate-ca")]
    Ca {
        /// Directory to write the CA into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue one host's certificate into a tls dir (ca.pem, cert.pem, key.pem).
    #[command(after_help = "Example:\n  \
                            migrate certs issue --ca /root/migrate-ca --name src.example --role source \\\n    \
                            --out /etc/migrate/tls")]
    Issue {
        /// Directory holding the CA (ca.pem, ca-key.pem).
        #[arg(long)]
        ca: PathBuf,
        /// The host's DNS name or IP address: as sources dial it, for a
        /// destination; as destinations list it in `migrate-dst --allow`, for
        /// a source.
        #[arg(long)]
        name: String,
        /// What the host is in migrations: a source dials (clientAuth), a
        /// destination listens (serverAuth); both for a host that is both.
        #[arg(long, value_enum, default_value_t = CertRole::Both)]
        role: CertRole,
        /// The host's tls dir to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `--compression`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompressionArg {
    Auto,
    None,
    Zstd,
}

impl From<CompressionArg> for CompressionChoice {
    fn from(arg: CompressionArg) -> Self {
        match arg {
            CompressionArg::Auto => Self::Auto,
            CompressionArg::None => Self::None,
            CompressionArg::Zstd => Self::Zstd,
        }
    }
}

/// `certs issue --role`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CertRole {
    Source,
    Destination,
    Both,
}

impl From<CertRole> for migrate_common::certs::Role {
    fn from(role: CertRole) -> Self {
        match role {
            CertRole::Source => Self::Source,
            CertRole::Destination => Self::Destination,
            CertRole::Both => Self::Both,
        }
    }
}

impl MigrationSettings {
    fn options(&self, container_id: String, destination: String) -> anyhow::Result<MigrateOptions> {
        Ok(MigrateOptions {
            container_id,
            destination,
            tls_dir: self.tls_dir.clone(),
            runc: Runc::new(&self.runc, &self.runc_root, Some(self.criu.clone())),
            criu: Criu::new(&self.criu),
            work_base: self.work_dir.clone(),
            state_dir: self.state_dir.clone(),
            freeze_timeout: Duration::from_secs(self.freeze_timeout),
            mode: self.mode,
            max_downtime: Duration::from_millis(self.max_downtime),
            max_rounds: self.max_rounds,
            link_timeout: Duration::from_secs(self.link_timeout),
            resume_timeout: Duration::from_secs(self.resume_timeout),
            ghost_limit: self.ghost_limit,
            compression: self.compression.into(),
            max_bandwidth: self.max_bandwidth,
            criu_options: CriuOptions {
                tcp_established: self.tcp_established,
                file_locks: self.file_locks,
                link_remap: self.link_remap,
                ext_unix_sk: self.ext_unix_sk,
            },
            migrate_exe: std::env::current_exe().context("locating the migrate executable")?,
        })
    }
}

/// The arguments with `migrate -- <id> [options]` read as `migrate [options]
/// -- <id>`: subcommand names win over container ids, so a container named
/// like one comes after `--`, and clap reads all that follows `--` as
/// positionals, options included.
fn container_id_after_options(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    if args.len() > 2 && args[1] == "--" {
        let id = args.remove(2);
        args.remove(1);
        args.extend([OsString::from("--"), id]);
    }
    args
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(container_id_after_options(std::env::args_os()));
    match cli.command {
        Some(Command::CriuActionHook { socket, record }) => {
            use migrate_common::hook::{run_action_hook, AgentGone, ACTION_ENV, POST_DUMP};
            let action = std::env::var(ACTION_ENV).unwrap_or_default();
            // Without a record to read, a hook whose agent is gone resumes.
            let gone = AgentGone::ConsultRecord(record.unwrap_or_default());
            let code = run_action_hook(&socket, &action, POST_DUMP, &gone);
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
        Some(Command::Certs(cmd)) => return report(certs(cmd), false),
        Some(Command::Completions { shell }) => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "migrate", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man { dir }) => return report(man_pages(dir.as_deref()), false),
        Some(Command::Resolve(args)) => {
            init_logging();
            return resolve(args);
        }
        Some(Command::Check(args)) => {
            init_logging();
            return cli_check::run(args);
        }
        Some(Command::Drain(args)) => {
            init_logging();
            return cli_drain::drain(args);
        }
        Some(Command::Ps(args)) => return cli_inventory::ps(args),
        Some(Command::Status(args)) => return cli_inventory::status(args),
        Some(Command::Cancel(args)) => return cli_inventory::cancel(args),
        None => {}
    }
    init_logging();
    let json = cli.migrate.settings.json;
    report(run_migration(cli.migrate), json)
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("MIGRATE_LOG"))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs go to files and journals.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn resolve(args: ResolveArgs) -> ExitCode {
    let opts = migrate_src::resolve::ResolveOptions {
        container_id: args.container_id,
        destination: args.to,
        go_back: args.go_back,
        tls_dir: args.tls_dir,
        state_dir: args.state_dir,
        runc: Runc::new(args.runc, args.runc_root, Some(args.criu)),
        link_timeout: Duration::from_secs(15),
    };
    let reporter = Reporter::new(std::io::stderr().is_terminal() && !args.json, args.json);
    let result = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(migrate_src::resolve::resolve(&opts, &reporter)));
    reporter.finish();
    match result {
        Ok(resolution) => {
            if args.json {
                match migrate_common::json::versioned(&resolution) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("migrate: error: {e}"),
                }
            } else {
                for action in &resolution.actions {
                    println!("{action}");
                }
                println!("{} runs on: {}", resolution.container, resolution.runs_on);
            }
            ExitCode::from(resolution.exit_code)
        }
        Err(e) => {
            if args.json {
                println!("{}", migrate_common::json::error(&format!("{e:#}")));
            }
            eprintln!("migrate: error: {e:#}");
            eprintln!("migrate: nothing was settled; the case stays as it was");
            ExitCode::from(migrate_src::EXIT_IN_DOUBT)
        }
    }
}

/// The exit status of `result`, its error said on stderr and, with `json`,
/// as a JSON report on stdout (a migration's failure has printed its own).
fn report(result: anyhow::Result<()>, json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate: error: {e:#}");
            match e.downcast_ref::<MigrationError>() {
                Some(failure) => {
                    eprintln!("migrate: {}", failure.outcome());
                    ExitCode::from(failure.exit_code())
                }
                None => {
                    if json {
                        println!("{}", migrate_common::json::error(&format!("{e:#}")));
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn certs(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Ca { out } => {
            migrate_common::certs::create_ca(&out)?;
            println!("CA written to {} (keep ca-key.pem private)", out.display());
        }
        CertsCommand::Issue {
            ca,
            name,
            role,
            out,
        } => {
            migrate_common::certs::issue_with_role(&ca, &name, role.into(), &out)?;
            let role = match role {
                CertRole::Source => "source",
                CertRole::Destination => "destination",
                CertRole::Both => "source and destination",
            };
            println!(
                "certificate for {name} ({role}) written to {}",
                out.display()
            );
        }
    }
    Ok(())
}

fn run_migration(args: MigrateArgs) -> anyhow::Result<()> {
    let (Some(container_id), Some(destination)) = (args.container_id, args.to) else {
        anyhow::bail!("a container id and --to are required");
    };
    if !migrate_common::valid_container_id(&container_id) {
        anyhow::bail!("{container_id:?} is not a valid container id");
    }
    let args = args.settings;
    let opts = args.options(container_id, destination)?;
    let interactive = std::io::stderr().is_terminal() && !args.json;
    let reporter = Reporter::new(interactive, args.json);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(migrate_src::migrate(&opts, &reporter));
    reporter.finish();
    match result {
        Ok(summary) if args.json => println!("{}", migrate_common::json::versioned(&summary)?),
        Ok(summary) => println!("{}", summary.human()),
        Err(failure) => {
            let (outcome, runs_on, exit_code, held_by) = (
                failure.outcome().to_owned(),
                failure.runs_on(),
                failure.exit_code(),
                failure.held_by(),
            );
            let error = anyhow::Error::from(failure);
            if args.json {
                let object = serde_json::json!({
                    "container": opts.container_id,
                    "destination": opts.destination,
                    "error": format!("{error:#}"),
                    "outcome": outcome,
                    "runs_on": runs_on,
                    "exit_code": exit_code,
                    "held_by_pid": held_by,
                });
                println!("{}", migrate_common::json::versioned(&object)?);
            }
            return Err(error);
        }
    }
    Ok(())
}

/// `migrate man`: the page on stdout, or every page into `dir`.
fn man_pages(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    match dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), dir)
            .with_context(|| format!("writing the man pages into {}", dir.display())),
        None => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .context("writing the man page"),
    }
}

mod cli_check;
mod cli_drain;
mod cli_inventory;

#[cfg(test)]
mod cli_tests;
