//! The command line as clap parses it: subcommands against container ids,
//! and the completions and man page generated from it.

use std::io::Write;
use std::process::Stdio;

use clap::{CommandFactory, Parser};

use migrate_common::transfer::compression::CompressionChoice;

use super::{container_id_after_options, Cli, Command};

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    let argv = std::iter::once("migrate").chain(args.iter().copied());
    Cli::try_parse_from(container_id_after_options(argv.map(Into::into)))
}

/// The visible subcommands: those a container id may collide with.
fn subcommands() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_owned())
        .collect()
}

#[test]
fn a_subcommand_name_is_the_subcommand() {
    let cli = parse(&["resolve", "web1", "--to", "h:1"]).expect("resolve parses");
    assert!(matches!(cli.command, Some(Command::Resolve(ref a)) if a.container_id == "web1"));
    assert!(cli.migrate.container_id.is_none());
}

#[test]
fn a_container_named_like_a_subcommand_comes_after_double_dash() {
    for name in subcommands() {
        for args in [
            vec!["--", &name, "--to", "h:1"],
            vec!["--to", "h:1", "--", &name],
            vec!["--to", "h:1", "--json", "--", &name],
        ] {
            let cli = parse(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(cli.command.is_none(), "{args:?} ran a subcommand");
            assert_eq!(cli.migrate.container_id.as_deref(), Some(name.as_str()));
            assert_eq!(cli.migrate.to.as_deref(), Some("h:1"));
        }
    }
}

#[test]
fn help_names_the_subcommands_a_container_id_collides_with() {
    let help = Cli::command().render_long_help().to_string();
    let rule = help
        .split("Subcommand names win over container ids")
        .nth(1)
        .expect("the help says subcommand names win");
    let rule = rule.split("\n\n").next().unwrap_or_default();
    for name in ["ps", "check", "drain", "status", "cancel", "resolve"] {
        assert!(
            subcommands().iter().any(|s| s == name),
            "no subcommand {name}"
        );
        assert!(
            rule.contains(name),
            "the help's rule does not name {name}: {rule}"
        );
    }
}

#[test]
fn a_plain_id_needs_no_double_dash() {
    let cli = parse(&["web1", "--to", "h:1"]).expect("parses");
    assert!(cli.command.is_none());
    assert_eq!(cli.migrate.container_id.as_deref(), Some("web1"));
}

#[test]
fn after_a_migration_option_a_name_is_an_id() {
    // clap's args_conflicts_with_subcommands: once a migration's option is
    // given, no subcommand follows, so the name can only be the container.
    let cli = parse(&["--to", "h:1", "resolve"]).expect("parses");
    assert!(cli.command.is_none());
    assert_eq!(cli.migrate.container_id.as_deref(), Some("resolve"));
}

#[test]
fn help_says_the_rule_and_gives_examples() {
    let help = Cli::command().render_long_help().to_string();
    assert!(help.contains("after `--`"), "{help}");
    let mut command = Cli::command();
    for sub in subcommands() {
        let help = command
            .find_subcommand_mut(&sub)
            .expect("listed")
            .render_long_help()
            .to_string();
        assert!(
            help.contains("Example"),
            "`migrate {sub} --help` has no example:\n{help}"
        );
    }
}

#[test]
fn bash_completion_is_valid_bash() {
    let mut script = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::Bash,
        &mut Cli::command(),
        "migrate",
        &mut script,
    );
    let text = String::from_utf8(script).expect("utf-8");
    for sub in subcommands() {
        assert!(text.contains(&sub), "completion lacks {sub}");
    }
    let mut bash = std::process::Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .spawn()
        .expect("bash");
    bash.stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("writing to bash");
    assert!(
        bash.wait().expect("bash ran").success(),
        "bash -n refused:\n{text}"
    );
}

#[test]
fn man_page_names_every_subcommand() {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .expect("renders");
    let page = String::from_utf8(page).expect("utf-8");
    assert!(page.contains(".TH"), "not roff:\n{page}");
    for sub in subcommands().iter().filter(|s| *s != "help") {
        let reference = format!("migrate\\-{}(1)", sub.replace('-', "\\-"));
        assert!(page.contains(&reference), "the man page lacks {reference}");
    }
}

#[test]
fn man_dir_has_a_page_for_every_subcommand() {
    let dir = tempfile::tempdir().expect("temp dir");
    super::man_pages(Some(dir.path())).expect("writes the pages");
    let main = std::fs::read_to_string(dir.path().join("migrate.1")).expect("migrate.1");
    assert!(main.contains(".TH"), "not roff:\n{main}");
    for sub in subcommands().iter().filter(|s| *s != "help") {
        let page = dir.path().join(format!("migrate-{sub}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(text.contains(".TH"), "{} is not roff", page.display());
    }
}

#[test]
fn compression_and_bandwidth_parse_and_default() {
    let cli = parse(&["web1", "--to", "h:1"]).expect("parses");
    let opts = cli
        .migrate
        .settings
        .options("web1".into(), "h:1".into())
        .expect("options");
    assert_eq!(opts.compression, CompressionChoice::Auto);
    assert_eq!(opts.max_bandwidth, None);
    let cli = parse(&[
        "web1",
        "--to",
        "h:1",
        "--compression",
        "zstd",
        "--max-bandwidth",
        "20MiB",
    ])
    .expect("parses");
    let opts = cli
        .migrate
        .settings
        .options("web1".into(), "h:1".into())
        .expect("options");
    assert_eq!(opts.compression, CompressionChoice::Zstd);
    assert_eq!(opts.max_bandwidth, Some(20 << 20));
    for bad in [
        &["web1", "--to", "h:1", "--compression", "lz4"][..],
        &["web1", "--to", "h:1", "--max-bandwidth", "fast"][..],
        &["web1", "--to", "h:1", "--max-bandwidth", "0"][..],
    ] {
        assert!(parse(bad).is_err(), "{bad:?} parsed");
    }
}
