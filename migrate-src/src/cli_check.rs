//! `migrate check`: the preflight alone, for each container and each
//! destination, with the destination's verdict on every item. Nothing is
//! frozen, claimed or recorded ([`migrate_src::check`]).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::HumanBytes;
use migrate_common::certs::TlsDir;
use migrate_common::criu::Criu;
use migrate_common::runc::{CriuOptions, Runc};
use migrate_src::check::{preflight_only, Verdict};
use migrate_src::mode::RequestedMode;
use migrate_src::MigrateOptions;
use serde::Serialize;

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Containers to check; none: every running container of the runc root.
    container_ids: Vec<String>,
    /// Destination daemon, host:port; repeat to check against several.
    #[arg(long = "to", required = true, value_name = "HOST:PORT")]
    destinations: Vec<String>,
    /// Directory with ca.pem, cert.pem and key.pem (see `migrate certs`).
    #[arg(long, default_value = "/etc/migrate/tls")]
    tls_dir: PathBuf,
    /// runc root holding the containers.
    #[arg(long, default_value = "/run/runc")]
    runc_root: PathBuf,
    /// runc binary.
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// CRIU binary.
    #[arg(long, default_value = "criu")]
    criu: PathBuf,
    /// The mode the migration would use: the destination checks it can
    /// take part (lazy pages for post-copy and hybrid).
    #[arg(long, value_enum, default_value_t = RequestedMode::Auto)]
    mode: RequestedMode,
    /// Check as for a migration with --tcp-established.
    #[arg(long)]
    tcp_established: bool,
    /// Check as for a migration with --file-locks.
    #[arg(long)]
    file_locks: bool,
    /// Check as for a migration with --link-remap.
    #[arg(long)]
    link_remap: bool,
    /// Check as for a migration with --ext-unix-sk.
    #[arg(long)]
    ext_unix_sk: bool,
    /// Print the verdicts as one JSON object on stdout, with `version`, the
    /// version of its schema.
    #[arg(long)]
    json: bool,
}

/// Every container, every destination: what each answered, or why it could
/// not be asked.
#[derive(Debug, Serialize)]
struct Report {
    /// Every container would move to every destination.
    accepted: bool,
    verdicts: Vec<Answer>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Answer {
    Verdict(Verdict),
    Failed {
        container: String,
        destination: String,
        accepted: bool,
        error: String,
    },
}

impl Answer {
    fn accepted(&self) -> bool {
        match self {
            Self::Verdict(v) => v.accepted,
            Self::Failed { .. } => false,
        }
    }

    fn human(&self) -> String {
        match self {
            Self::Verdict(v) => human(v),
            Self::Failed {
                container,
                destination,
                error,
                ..
            } => format!("{container} → {destination}: cannot check: {error}\n  would not move"),
        }
    }
}

pub(crate) fn run(args: CheckArgs) -> ExitCode {
    let json = args.json;
    match check(args) {
        Ok(report) => {
            if json {
                match migrate_common::json::versioned(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("migrate: error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                let blocks: Vec<String> = report.verdicts.iter().map(Answer::human).collect();
                println!("{}", blocks.join("\n\n"));
            }
            if report.accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            if json {
                println!("{}", migrate_common::json::error(&format!("{e:#}")));
            }
            eprintln!("migrate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(args: CheckArgs) -> anyhow::Result<Report> {
    let runc = Runc::new(args.runc, args.runc_root, Some(args.criu.clone()));
    let ids = if args.container_ids.is_empty() {
        let running: Vec<String> = runc
            .list()
            .context("listing the containers to check")?
            .into_iter()
            .filter(|c| c.is_running())
            .map(|c| c.id)
            .collect();
        if running.is_empty() {
            bail!(
                "no running container in runc root {} to check",
                runc.root.display()
            );
        }
        running
    } else {
        args.container_ids
    };
    if let Some(bad) = ids
        .iter()
        .find(|id| !migrate_common::valid_container_id(id))
    {
        bail!("{bad:?} is not a valid container id");
    }
    let tls = TlsDir::load(&args.tls_dir).context("loading TLS material")?;
    let template = MigrateOptions {
        container_id: String::new(),
        destination: String::new(),
        tls_dir: args.tls_dir,
        runc,
        criu: Criu::new(args.criu),
        mode: args.mode,
        criu_options: CriuOptions {
            tcp_established: args.tcp_established,
            file_locks: args.file_locks,
            link_remap: args.link_remap,
            ext_unix_sk: args.ext_unix_sk,
        },
        link_timeout: Duration::from_secs(15),
        // A check freezes, dumps and records nothing: what follows only
        // completes the options, as a migration's defaults.
        work_base: PathBuf::from("/dev/shm/migrate"),
        state_dir: PathBuf::from("/var/lib/migrate"),
        freeze_timeout: Duration::from_secs(120),
        ghost_limit: 64 << 20,
        migrate_exe: std::env::current_exe().context("locating the migrate executable")?,
        max_downtime: Duration::from_millis(300),
        max_rounds: 8,
        resume_timeout: Duration::from_secs(60),
        compression: Default::default(),
        max_bandwidth: None,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let interactive = std::io::stderr().is_terminal() && !args.json;
    let mut verdicts = Vec::new();
    for id in &ids {
        for destination in &args.destinations {
            if interactive {
                eprintln!("checking {id} against {destination}");
            }
            let opts = MigrateOptions {
                container_id: id.clone(),
                destination: destination.clone(),
                ..template.clone()
            };
            verdicts.push(match runtime.block_on(preflight_only(&opts, &tls)) {
                Ok(verdict) => Answer::Verdict(verdict),
                Err(e) => Answer::Failed {
                    container: id.clone(),
                    destination: destination.clone(),
                    accepted: false,
                    error: format!("{e:#}"),
                },
            });
        }
    }
    Ok(Report {
        accepted: verdicts.iter().all(Answer::accepted),
        verdicts,
    })
}

/// A verdict as lines: the pair, an item per line, the conclusion.
fn human(v: &Verdict) -> String {
    let host = if v.hostname.is_empty() {
        String::new()
    } else {
        format!(" ({})", v.hostname)
    };
    let mut lines = vec![format!(
        "{} → {}{host}: {} memory, {} of rootfs changes, {}",
        v.container,
        v.destination,
        HumanBytes(v.memory_bytes),
        HumanBytes(v.upper_bytes),
        v.mode
    )];
    for item in &v.items {
        let mark = if item.ok { "✓" } else { "✗" };
        // A tool's output in a detail keeps its lines, under the item.
        let detail = item.detail.replace('\n', "\n      ");
        lines.push(format!("  {mark} {}: {detail}", item.name));
    }
    // A destination older than the items gives only its refusals.
    if v.items.is_empty() {
        lines.extend(v.refusals.iter().map(|r| format!("  ✗ {r}")));
    }
    lines.push(if v.accepted {
        "  would move".to_owned()
    } else {
        format!("  would not move: {}", v.refusals.join("; "))
    });
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use migrate_src::check::Item;

    use super::*;

    fn verdict(items: Vec<Item>, refusals: &[&str]) -> Verdict {
        Verdict {
            container: "web1".into(),
            destination: "dst.example:7070".into(),
            mode: "pre-copy",
            memory_bytes: 64 << 20,
            upper_bytes: 4096,
            accepted: refusals.is_empty(),
            refusals: refusals.iter().map(|r| (*r).to_owned()).collect(),
            hostname: "dst".into(),
            free_bytes: 1 << 30,
            image_free_bytes: 1 << 30,
            mem_available_bytes: 1 << 30,
            criu_version: "4.2.1".into(),
            runc_version: "1.1.5".into(),
            missing_layers: 0,
            items,
        }
    }

    fn item(name: &str, ok: bool, detail: &str) -> Item {
        Item {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }

    #[test]
    fn a_verdict_reads_item_by_item() {
        let text = human(&verdict(
            vec![
                item("protocol", true, "version 4"),
                item("policy", false, "a hook"),
            ],
            &["a hook"],
        ));
        assert_eq!(
            text,
            "web1 → dst.example:7070 (dst): 64.00 MiB memory, 4.00 KiB of rootfs changes, \
             pre-copy\n  ✓ protocol: version 4\n  ✗ policy: a hook\n  would not move: a hook"
        );
        let cpu = human(&verdict(
            vec![item("cpu", false, "refused:\nError (cpu.c:262)")],
            &["refused:\nError (cpu.c:262)"],
        ));
        assert!(
            cpu.contains("\n  ✗ cpu: refused:\n      Error (cpu.c:262)\n"),
            "{cpu}"
        );
        let accepted = human(&verdict(vec![item("disk", true, "room")], &[]));
        assert!(
            accepted.ends_with("  ✓ disk: room\n  would move"),
            "{accepted}"
        );
    }

    #[test]
    fn an_old_destination_gives_its_refusals() {
        let text = human(&verdict(Vec::new(), &["no room"]));
        assert!(text.contains("\n  ✗ no room\n"), "{text}");
    }

    #[test]
    fn the_json_report_lists_verdicts_and_failures() {
        let report = Report {
            accepted: false,
            verdicts: vec![
                Answer::Verdict(verdict(vec![item("disk", true, "room")], &[])),
                Answer::Failed {
                    container: "web2".into(),
                    destination: "dst.example:7070".into(),
                    accepted: false,
                    error: "connecting".into(),
                },
            ],
        };
        let value: serde_json::Value =
            serde_json::from_str(&migrate_common::json::versioned(&report).expect("serialises"))
                .expect("JSON");
        assert_eq!(value["version"], 1);
        assert_eq!(value["accepted"], false);
        assert_eq!(value["verdicts"][0]["items"][0]["name"], "disk");
        assert_eq!(value["verdicts"][0]["accepted"], true);
        assert_eq!(value["verdicts"][1]["error"], "connecting");
    }
}
