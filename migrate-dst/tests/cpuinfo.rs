//! The CPU check with the real CRIU: a source whose CPU offers what this
//! host's lacks is refused with CRIU's reason, before anything moves, and
//! this host's own CPU is accepted. The two hosts of the end-to-end tests
//! share one CPU, so the other CPU is a recorded image
//! (testdata/knights-mill-cpuinfo.img, see testdata/README.md). Needs root
//! and CRIU >= 4.2: without them these tests fail, they are not skipped.

#![allow(clippy::unwrap_used)]

mod support;

use migrate_common::criu::Criu;
use migrate_common::protocol::{Hello, PreflightCheck, PreflightReply};
use support::{connect, hello, preflight, runc_spec, start_daemon, Setup};

const KNIGHTS_MILL: &[u8] = include_bytes!("testdata/knights-mill-cpuinfo.img");

/// The preflight of `web1` from a source whose CPU `cpuinfo` records, by a
/// destination running the installed CRIU.
async fn ask_with_cpuinfo(cpuinfo: Vec<u8>) -> PreflightReply {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the CPU check tests run the real CRIU, which needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        working_tools: true,
        real_criu: true,
        ..Setup::default()
    };
    let (port, daemon) = start_daemon(dir.path(), setup).await;
    let (endpoint, conn, mut control) = connect(dir.path(), port).await.unwrap();
    let question = Hello {
        cpuinfo,
        preflight_only: true,
        ..hello("web1", &runc_spec().to_string())
    };
    let reply = preflight(&mut control, question).await;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    daemon.abort();
    reply
}

fn item<'a>(reply: &'a PreflightReply, name: &str) -> &'a PreflightCheck {
    reply
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} item: {reply:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn another_cpu_is_refused_with_crius_reason() {
    let reply = ask_with_cpuinfo(KNIGHTS_MILL.to_vec()).await;
    assert!(!reply.accepted, "{reply:#?}");
    let cpu = item(&reply, "cpu");
    assert!(!cpu.ok, "{cpu:?}");
    assert!(cpu.detail.contains("criu cpuinfo check"), "{cpu:?}");
    // CRIU's own words, from its cpu.c.
    assert!(cpu.detail.contains("Error (criu/arch/x86/cpu.c"), "{cpu:?}");
    // That is the only reason: everything else about the host is fine.
    assert_eq!(
        reply.refusals,
        std::slice::from_ref(&cpu.detail),
        "{reply:#?}"
    );
    assert!(
        reply.checks.iter().all(|c| c.ok || c.name == "cpu"),
        "{reply:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn this_hosts_own_cpu_is_accepted() {
    let own = Criu::new("criu").cpuinfo_dump().unwrap();
    assert!(!own.is_empty(), "criu cpuinfo dump wrote no image");
    let reply = ask_with_cpuinfo(own).await;
    assert!(reply.accepted, "{reply:#?}");
    let cpu = item(&reply, "cpu");
    assert!(cpu.ok && cpu.detail.contains("accepts"), "{cpu:?}");
}
