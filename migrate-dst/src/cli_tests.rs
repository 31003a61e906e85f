//! The completions, man page and help generated from the command line.

use std::io::Write;
use std::process::Stdio;

use clap::CommandFactory;

use super::Cli;

/// The visible subcommands.
fn subcommands() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_owned())
        .collect()
}

#[test]
fn every_help_has_an_example() {
    let mut command = Cli::command();
    let help = command.render_long_help().to_string();
    assert!(help.contains("Example"), "{help}");
    for sub in subcommands() {
        let help = command
            .find_subcommand_mut(&sub)
            .expect("listed")
            .render_long_help()
            .to_string();
        assert!(
            help.contains("Example"),
            "`migrate-dst {sub} --help` has no example:\n{help}"
        );
    }
}

#[test]
fn bash_completion_is_valid_bash() {
    let mut script = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::Bash,
        &mut Cli::command(),
        "migrate-dst",
        &mut script,
    );
    let text = String::from_utf8(script).expect("utf-8");
    for word in subcommands()
        .iter()
        .map(String::as_str)
        .chain(["--allow", "--listen"])
    {
        assert!(text.contains(word), "completion lacks {word}");
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
        let reference = format!("migrate\\-dst\\-{}(1)", sub.replace('-', "\\-"));
        assert!(page.contains(&reference), "the man page lacks {reference}");
    }
}

#[test]
fn man_dir_has_a_page_for_every_subcommand() {
    let dir = tempfile::tempdir().expect("temp dir");
    super::man_pages(Some(dir.path())).expect("writes the pages");
    let main = std::fs::read_to_string(dir.path().join("migrate-dst.1")).expect("migrate-dst.1");
    assert!(main.contains(".TH"), "not roff:\n{main}");
    for sub in subcommands().iter().filter(|s| *s != "help") {
        let page = dir.path().join(format!("migrate-dst-{sub}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(text.contains(".TH"), "{} is not roff", page.display());
    }
}
