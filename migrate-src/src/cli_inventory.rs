//! The operator's commands around a drain: `migrate ps`, `migrate status`
//! and `migrate cancel <id> | --drain`, over [`migrate_src::ps`],
//! [`migrate_src::status`] and [`migrate_src::cancel`] (a drain's cancel is
//! the drain's: [`crate::cli_drain::cancel`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use migrate_common::runc::Runc;

pub const PS_EXAMPLES: &str = "Examples:\n  \
                               migrate ps\n  \
                               migrate ps --runc-root /run/containerd/runc/default --json";
pub const STATUS_EXAMPLES: &str = "Examples:\n  \
                                   migrate status\n  \
                                   migrate status --state-dir /var/lib/migrate --json";
pub const CANCEL_EXAMPLES: &str = "\
<id>: the process holding the migration's record (a `migrate`, or a `migrate drain`, whose \
other migrations go on) gets SIGUSR2 and the request <state-dir>/migrations/<id>.cancel; the \
migration rolls back if it has not decided, and finishes if it has.
--drain: the drain running on --state-dir (found through <state-dir>/drain.pid) gets SIGUSR1: \
it starts no further migration, those under way finish, and the containers not started are \
reported skipped.

Exit status: 0 the migration ended (rolled back, or finished if it had decided), or the drain \
was told; 1 nothing to cancel, or it did not end in time.

Examples:
  migrate cancel web1
  migrate cancel 3f2a9c0e5b7d4e1f8a6b2c9d0e4f1a7b --json
  migrate cancel --drain";

#[derive(Debug, Args)]
pub struct PsArgs {
    #[arg(long, default_value = "/run/runc")]
    runc_root: PathBuf,
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// Where the migrations' records are: a container a migration holds
    /// is not migratable.
    #[arg(long, default_value = migrate_src::status::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Print one JSON object on stdout, the entries under `containers`
    /// (or the error), with `version`, the version of its schema.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, default_value = migrate_src::status::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Print one JSON object on stdout, the entries under `migrations`
    /// (or the error), with `version`, the version of its schema.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["id", "drain"])))]
pub struct CancelArgs {
    /// The container's id (or the migration's id, from `migrate status`).
    pub(crate) id: Option<String>,
    /// Cancel the drain running on --state-dir instead: it starts no
    /// further migration; those under way finish.
    #[arg(long, conflicts_with = "id")]
    pub(crate) drain: bool,
    #[arg(long, default_value = migrate_src::status::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// runc root holding the container: says where it runs afterwards.
    #[arg(long, default_value = "/run/runc")]
    runc_root: PathBuf,
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// Seconds to wait for the migration's `migrate` to end.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    wait: u64,
    /// Print what was done (or the error) as one JSON object on stdout,
    /// with `version`, the version of its schema.
    #[arg(long)]
    json: bool,
}

pub fn ps(args: PsArgs) -> ExitCode {
    let runc = Runc::new(args.runc, args.runc_root, None);
    let result = migrate_src::ps::ps(&runc, &args.state_dir)
        .context("migrate ps")
        .and_then(|entries| {
            if args.json {
                let report = serde_json::json!({ "containers": entries });
                println!("{}", migrate_common::json::versioned(&report)?);
            } else if entries.is_empty() {
                println!("no container in {}", runc.root.display());
            } else {
                print!("{}", migrate_src::ps::table(&entries));
            }
            Ok(())
        });
    done(result, args.json)
}

pub fn status(args: StatusArgs) -> ExitCode {
    let result = migrate_src::status::status(&args.state_dir)
        .with_context(|| format!("reading the records in {}", args.state_dir.display()))
        .and_then(|migrations| {
            if args.json {
                let report = serde_json::json!({ "migrations": migrations });
                println!("{}", migrate_common::json::versioned(&report)?);
            } else if migrations.is_empty() {
                println!("no migration recorded on this host");
            } else {
                for migration in &migrations {
                    println!("{}", migration.line());
                }
            }
            Ok(())
        });
    done(result, args.json)
}

pub fn cancel(args: CancelArgs) -> ExitCode {
    let Some(id) = args.id.as_deref().filter(|_| !args.drain) else {
        return done(crate::cli_drain::cancel(&args.state_dir), args.json);
    };
    let wait = Duration::from_secs(args.wait);
    let runc = Runc::new(args.runc, args.runc_root, None);
    let result = migrate_src::cancel::cancel(&args.state_dir, &runc, id, wait)
        .map_err(anyhow::Error::from)
        .and_then(|cancelled| {
            if args.json {
                println!("{}", migrate_common::json::versioned(&cancelled)?);
            } else {
                println!("{}", cancelled.line());
            }
            Ok(())
        });
    done(result, args.json)
}

fn done(result: anyhow::Result<()>, json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                println!("{}", migrate_common::json::error(&format!("{e:#}")));
            }
            eprintln!("migrate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
