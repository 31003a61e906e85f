//! `migrate drain` and `migrate cancel --drain`: their arguments and how
//! the binary runs them over [`migrate_src::drain`].

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use migrate_src::drain::progress::DrainProgress;
use migrate_src::drain::schedule::At;
use migrate_src::drain::select::{Filter, Order};
use migrate_src::drain::DrainOptions;

use crate::MigrationSettings;

pub const DRAIN_AFTER_HELP: &str = "\
Containers go largest memory first (--order), each to the destination that accepted it in \
its preflight and has the most memory left once earlier placements are counted. A container \
no destination accepts is skipped with every reason; one whose migration fails keeps running \
here, and the drain goes on (unless --stop-on-error). SIGUSR1 (`migrate cancel --drain`), \
SIGINT or SIGTERM: no further migration starts; on SIGINT and SIGTERM those under way roll \
back at their safe point (or finish, once decided), on SIGUSR1 they finish. The drain holds \
<state-dir>/drain.pid while it runs; a second drain on the same state dir is refused.

Exit status: 0 every container moved (or there was none to move); 1 none moved, each runs \
here as before; 2 usage error; 3 some are in doubt (see `migrate resolve`); 4 one is lost \
(must never happen); 5 partial: some moved, the others (skipped or failed) run here; 6 every \
container moved but the reboot command failed. A dry run counts \"would move\" as moved.

Examples:
  migrate drain --to dst1.example:7070 --to dst2.example:7070 --parallel 2
  migrate drain --to dst1.example:7070 --dry-run --json
  migrate drain --to dst1.example:7070 --filter 'web-*' --at 03:00 --reboot";

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// A destination daemon, host:port (repeatable); ties go to the first.
    #[arg(long, required = true, value_name = "HOST:PORT")]
    to: Vec<String>,
    /// Only containers whose id matches this glob (repeatable: any).
    #[arg(long, value_name = "GLOB")]
    filter: Vec<String>,
    /// Migrations at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    parallel: u16,
    /// The order containers start in: memory (largest first), name, or
    /// given (the order of the --filter each first matches).
    #[arg(long, value_enum, default_value_t = Order::Memory)]
    order: Order,
    /// Start no further migration once one fails.
    #[arg(long)]
    stop_on_error: bool,
    /// Ask every destination's preflight and say what would move where,
    /// and what would not and why; nothing is frozen or claimed.
    #[arg(long, conflicts_with_all = ["at", "reboot"])]
    dry_run: bool,
    /// Start then: RFC 3339 (2026-12-06T03:00:00Z), HH:MM local time (the
    /// next one), or +DURATION from now (+90s, +1h 30m).
    #[arg(long, value_name = "TIME")]
    at: Option<At>,
    /// Reboot this host afterwards (`systemctl reboot`), only if every
    /// container moved.
    #[arg(long)]
    reboot: bool,
    /// The command --reboot runs, split on whitespace.
    #[arg(
        long,
        hide = true,
        default_value = "systemctl reboot",
        requires = "reboot"
    )]
    reboot_command: String,
    #[command(flatten)]
    settings: MigrationSettings,
}

/// Runs a drain; the report (or the error) on stdout, its exit status.
pub fn drain(args: DrainArgs) -> ExitCode {
    let json = args.settings.json;
    match run(args) {
        Ok(report) => {
            if json {
                match migrate_common::json::versioned(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("migrate: error: {e}"),
                }
            } else {
                println!("{}", report.human());
            }
            ExitCode::from(report.exit_code)
        }
        Err(e) => {
            if json {
                println!("{}", migrate_common::json::error(&format!("{e:#}")));
            }
            eprintln!("migrate: error: {e:#}");
            eprintln!("migrate: the drain did not start: every container runs here as before");
            ExitCode::FAILURE
        }
    }
}

fn run(args: DrainArgs) -> anyhow::Result<migrate_src::drain::report::DrainReport> {
    let opts = DrainOptions {
        filter: Filter::new(args.filter.as_slice())?,
        order: args.order,
        parallel: usize::from(args.parallel),
        stop_on_error: args.stop_on_error,
        dry_run: args.dry_run,
        at: args.at,
        reboot: args.reboot.then(|| {
            args.reboot_command
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        }),
        migration: args.settings.options(String::new(), String::new())?,
        destinations: args.to,
    };
    let interactive = std::io::stderr().is_terminal() && !args.settings.json;
    let progress = DrainProgress::new(interactive, args.settings.json);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let report = runtime.block_on(migrate_src::drain::drain(&opts, &progress));
    progress.finish();
    Ok(report?)
}

/// `migrate cancel --drain`: the drain on `state_dir` starts no further
/// migration.
pub fn cancel(state_dir: &Path) -> anyhow::Result<()> {
    let pid =
        migrate_src::drain::pidfile::signal_drain(state_dir, nix::sys::signal::Signal::SIGUSR1)?;
    println!("asked the drain (pid {pid}) to start no further migration");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use crate::{Cli, Command};

    fn drain(args: &[&str]) -> Result<super::DrainArgs, clap::Error> {
        let argv = ["migrate", "drain"].into_iter().chain(args.iter().copied());
        match Cli::try_parse_from(argv)?.command {
            Some(Command::Drain(args)) => Ok(args),
            other => panic!("not a drain: {other:?}"),
        }
    }

    #[test]
    fn to_is_repeatable_and_required() {
        let args = drain(&["--to", "a:1", "--to", "b:2"]).unwrap();
        assert_eq!(args.to, ["a:1", "b:2"]);
        assert!(drain(&[]).is_err());
    }

    #[test]
    fn defaults() {
        let args = drain(&["--to", "a:1"]).unwrap();
        assert_eq!(args.parallel, 1);
        assert_eq!(args.order, super::Order::Memory);
        assert!(!args.reboot && !args.dry_run && !args.stop_on_error);
        assert_eq!(args.reboot_command, "systemctl reboot");
        assert_eq!(
            args.settings.state_dir,
            std::path::Path::new("/var/lib/migrate")
        );
    }

    #[test]
    fn at_forms() {
        for at in [
            "2026-12-06T03:00:00Z",
            "03:00",
            "+5s",
            "2026-12-06T03:00:00+01:00",
        ] {
            let args = drain(&["--to", "a:1", "--at", at]).unwrap();
            assert!(args.at.is_some(), "{at}");
        }
        assert!(drain(&["--to", "a:1", "--at", "soon"]).is_err());
    }

    #[test]
    fn conflicts_and_bounds() {
        assert!(drain(&["--to", "a:1", "--dry-run", "--reboot"]).is_err());
        assert!(drain(&["--to", "a:1", "--dry-run", "--at", "+1s"]).is_err());
        assert!(drain(&["--to", "a:1", "--parallel", "0"]).is_err());
        assert!(drain(&["--to", "a:1", "--reboot-command", "true"]).is_err());
        assert!(drain(&["--to", "a:1", "--order", "random"]).is_err());
    }

    #[test]
    fn migration_settings_apply_to_each() {
        let args = drain(&[
            "--to",
            "a:1",
            "--mode",
            "post-copy",
            "--max-downtime",
            "50",
            "--tcp-established",
            "--compression",
            "none",
            "--max-bandwidth",
            "1Gbit",
            "--filter",
            "web-*",
            "--filter",
            "db-*",
            "--order",
            "given",
            "--parallel",
            "3",
            "--json",
        ])
        .unwrap();
        let opts = args.settings.options("c".into(), "a:1".into()).unwrap();
        assert_eq!(opts.mode, migrate_src::mode::RequestedMode::PostCopy);
        assert_eq!(opts.max_downtime, std::time::Duration::from_millis(50));
        assert!(opts.criu_options.tcp_established);
        assert_eq!(
            opts.compression,
            migrate_common::transfer::compression::CompressionChoice::None
        );
        assert_eq!(opts.max_bandwidth, Some(125_000_000));
        assert!(args.settings.json);
        assert_eq!(args.filter, ["web-*", "db-*"]);
        assert_eq!(args.parallel, 3);
    }

    #[test]
    fn cancel_takes_an_id_or_drain() {
        assert!(Cli::try_parse_from(["migrate", "cancel"]).is_err());
        assert!(Cli::try_parse_from(["migrate", "cancel", "web1", "--drain"]).is_err());
        let cli =
            Cli::try_parse_from(["migrate", "cancel", "--drain", "--state-dir", "/tmp/s"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Cancel(ref a)) if a.drain && a.id.is_none()));
        let cli = Cli::try_parse_from(["migrate", "cancel", "web1"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Cancel(ref a)) if !a.drain && a.id.as_deref() == Some("web1"))
        );
    }

    #[test]
    fn help_lists_the_exit_codes() {
        use clap::CommandFactory;
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("drain")
            .unwrap()
            .render_long_help()
            .to_string();
        for code in ["0 every", "1 none", "3 some", "5 partial", "6 every"] {
            assert!(help.contains(code), "{code}: {help}");
        }
        assert!(
            !help.contains("reboot-command"),
            "a hidden option shows:\n{help}"
        );
    }
}
