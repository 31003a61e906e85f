use std::time::Duration;

use super::*;
use crate::record::{store, SourceRecord};

#[test]
fn script_reports_only_the_listed_actions_and_quotes_paths() {
    let s = action_script(
        Path::new("/opt/it's/migrate"),
        Path::new("/run/m/h.sock"),
        SOURCE_ACTIONS,
        &[Path::new("/var/lib/migrate/migrations/c1.json")],
    );
    assert!(s.starts_with("#!/bin/sh\n"));
    assert!(
        s.contains("case \"$CRTOOLS_SCRIPT_ACTION\" in\n  pre-dump|post-dump|status-ready) ;;"),
        "{s}"
    );
    assert!(
        s.ends_with(
            "exec '/opt/it'\\''s/migrate' criu-action-hook '/run/m/h.sock' --record \
             '/var/lib/migrate/migrations/c1.json'\n"
        ),
        "{s}"
    );
}

#[test]
fn script_runs_the_hook_for_listed_actions_only() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hook.sh");
    // A stand-in for the agent binary that says how it was called.
    let exe = dir.path().join("fake-hook");
    std::fs::write(&exe, "#!/bin/sh\necho \"called $*\"\n").unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    write_action_script(
        &script,
        &action_script(&exe, Path::new("/s.sock"), DESTINATION_ACTIONS, &[]),
    )
    .unwrap();
    let run = |action: &str| {
        let out = std::process::Command::new(&script)
            .env(ACTION_ENV, action)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("post-restore"), "called criu-action-hook /s.sock\n");
    assert_eq!(run("setup-namespaces"), "");
}

async fn hook(socket: PathBuf, action: &'static str, held: &'static str, gone: AgentGone) -> i32 {
    tokio::task::spawn_blocking(move || run_action_hook(&socket, action, held, &gone))
        .await
        .unwrap()
}

fn record_at(dir: &Path) -> AgentGone {
    AgentGone::ConsultRecord(dir.join("record.json"))
}

#[tokio::test(flavor = "multi_thread")]
async fn held_action_blocks_until_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hook.sock");
    let mut gate = Gate::bind(&socket, POST_DUMP).unwrap();
    assert_eq!(
        hook(socket.clone(), "pre-dump", POST_DUMP, record_at(dir.path())).await,
        0
    );
    assert_eq!(gate.next_event().await.unwrap().action, "pre-dump");

    let pending = tokio::spawn(hook(
        socket.clone(),
        "post-dump",
        POST_DUMP,
        record_at(dir.path()),
    ));
    assert_eq!(gate.next_event().await.unwrap().action, "post-dump");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !pending.is_finished(),
        "post-dump must wait for the verdict"
    );
    gate.decide(Verdict::Proceed);
    assert_eq!(pending.await.unwrap(), 0);
    // A repeated post-dump gets the same answer at once.
    assert_eq!(
        hook(socket, "post-dump", POST_DUMP, record_at(dir.path())).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn undo_fails_the_held_action() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hook.sock");
    let gate = Gate::bind(&socket, POST_RESTORE).unwrap();
    gate.decide(Verdict::Undo);
    assert_eq!(
        hook(
            socket,
            "post-restore",
            POST_RESTORE,
            AgentGone::WaitForAgent
        )
        .await,
        1
    );
}

fn source_record(phase: SourcePhase) -> SourceRecord {
    SourceRecord {
        migration_id: "m".into(),
        container_id: "c1".into(),
        destination: "d:1".into(),
        mode: "stop-and-copy".into(),
        phase,
        holder_pid: None,
        work_dir: None,
        agent_pid: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_hook_without_its_agent_follows_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let gone = record_at(dir.path());
    // No record, then no decision: the source copy resumes.
    assert_eq!(
        hook(socket.clone(), "post-dump", POST_DUMP, gone.clone()).await,
        1
    );
    store(
        &dir.path().join("record.json"),
        &source_record(SourcePhase::Started),
    )
    .unwrap();
    assert_eq!(
        hook(socket.clone(), "post-dump", POST_DUMP, gone.clone()).await,
        1
    );
    // Decided: the source copy ends, agent or no agent.
    store(
        &dir.path().join("record.json"),
        &source_record(SourcePhase::Decided),
    )
    .unwrap();
    assert_eq!(
        hook(socket.clone(), "post-dump", POST_DUMP, gone.clone()).await,
        0
    );
    // Other actions never fail a dump.
    assert_eq!(hook(socket, "network-lock", POST_DUMP, gone).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_dies_while_the_hook_waits_hands_over_to_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hook.sock");
    store(
        &dir.path().join("record.json"),
        &source_record(SourcePhase::Decided),
    )
    .unwrap();
    let mut gate = Gate::bind(&socket, POST_DUMP).unwrap();
    let pending = tokio::spawn(hook(socket, "post-dump", POST_DUMP, record_at(dir.path())));
    gate.next_event().await.unwrap();
    drop(gate);
    assert_eq!(pending.await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_hook_waits_for_a_restarted_agent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hold.sock");
    let mut first = Gate::bind(&socket, POST_RESTORE).unwrap();
    let pending = tokio::spawn(hook(
        socket.clone(),
        "post-restore",
        POST_RESTORE,
        AgentGone::WaitForAgent,
    ));
    first.next_event().await.unwrap();
    // The agent dies: the hook neither releases nor kills on its own.
    drop(first);
    tokio::time::sleep(AGENT_RETRY * 3).await;
    assert!(!pending.is_finished(), "the hook decided without an agent");
    // A restarted agent binds the same socket and answers in its place.
    std::fs::remove_file(&socket).unwrap();
    let mut second = Gate::bind(&socket, POST_RESTORE).unwrap();
    assert_eq!(second.next_event().await.unwrap().action, "post-restore");
    second.decide(Verdict::Proceed);
    assert_eq!(pending.await.unwrap(), 0);
}
