//! The policy's decisions on names, paths and configs.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::config::{beyond_baseline, BASE_MASKED_PATHS, BASE_READONLY_PATHS};
use super::*;

/// What `runc spec` (runc 1.1.5) writes: the baseline.
const RUNC_SPEC: &str = include_str!("../testdata/runc-spec.json");

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|n| (*n).to_owned()).collect()
}

fn policy(sources: &[&str], binds: &[&str]) -> Policy {
    Policy::new(
        &names(sources),
        binds.iter().map(PathBuf::from).collect(),
        false,
    )
    .unwrap()
}

#[test]
fn no_allow_admits_nobody_and_says_how_to() {
    let p = policy(&[], &[]);
    assert!(p.allows_no_source());
    assert!(!p.admits(&names(&["198.18.0.1"])));
    assert!(!p.admits(&[]));
    let refusal = p.refusal(Some("198.18.0.1"));
    assert!(refusal.contains("source 198.18.0.1"), "{refusal}");
    assert!(refusal.contains("allows no source"), "{refusal}");
    assert!(refusal.contains("--allow 198.18.0.1"), "{refusal}");
    assert!(p.refusal(None).contains("carries no name"));
}

#[test]
fn names_match_by_value_not_by_spelling() {
    let p = policy(&["Src.Example.", "[fd00::1]", "198.18.0.1"], &[]);
    assert!(!p.allows_no_source());
    for ok in ["src.example", "SRC.EXAMPLE", "fd00:0::1", "198.18.0.1"] {
        assert!(p.admits(&names(&[ok])), "{ok}");
    }
    // Any name the certificate carries counts.
    assert!(p.admits(&names(&["other.example", "198.18.0.1"])));
    for refused in [
        "src.example.net",
        "198.18.0.10",
        "fd00::2",
        "example",
        "not a name",
    ] {
        assert!(!p.admits(&names(&[refused])), "{refused}");
    }
    let refusal = p.refusal(Some("other.example"));
    assert!(
        refusal.contains("it allows src.example, fd00::1, 198.18.0.1"),
        "{refusal}"
    );
}

#[test]
fn bad_flags_are_refused() {
    assert!(matches!(
        Policy::new(&names(&["has space"]), vec![], false),
        Err(PolicyError::BadName { .. })
    ));
    for root in ["relative", "/srv/../etc", "/srv/x/.."] {
        assert!(matches!(
            Policy::new(&[], vec![PathBuf::from(root)], false),
            Err(PolicyError::BadBindRoot { .. })
        ));
    }
}

#[test]
fn bind_sources_are_judged_by_their_text() {
    let p = policy(&[], &["/srv/data", "/mnt/shared"]);
    // `.` is no step anywhere, on the host either.
    for ok in [
        "/srv/data",
        "/srv/data/a/b",
        "/mnt/shared/x",
        "/srv/./data/x",
    ] {
        assert!(p.bind_allowed(Path::new(ok)), "{ok}");
    }
    for refused in [
        "/srv/data2",
        "/srv",
        "/etc",
        "/srv/data/../../etc",
        "/srv/data/x/..",
        "srv/data",
    ] {
        assert!(!p.bind_allowed(Path::new(refused)), "{refused}");
    }
    assert_eq!(p.bind_roots_text(), "--allow-bind /srv/data, /mnt/shared");
    assert_eq!(
        policy(&[], &[]).bind_roots_text(),
        "this destination allows none"
    );
}

#[test]
fn check_lists_binds_outside_and_relative_and_privileged_lifts_all() {
    let text = RUNC_SPEC.replace(
        r#""mounts": ["#,
        r#""hooks": {"prestart": [{"path": "/bin/x"}]},
        "mounts": [
            {"destination": "/a", "type": "bind", "source": "/srv/data/a"},
            {"destination": "/b", "type": "bind", "source": "/etc"},
            {"destination": "/c", "source": "rel", "options": ["rbind"]},"#,
    );
    let config = BundleConfig::parse(&text).unwrap();
    let found: Vec<String> = policy(&[], &["/srv/data"])
        .check(&config)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].contains("hooks.prestart"), "{found:#?}");
    assert!(found[1].contains("/etc"), "{found:#?}");
    assert!(found[1].contains("--allow-bind /srv/data"), "{found:#?}");
    assert!(found[2].contains("rel"), "{found:#?}");

    let privileged = Policy::new(&[], vec![], true).unwrap();
    assert!(privileged.check(&config).is_empty());
    assert!(privileged.bind_allowed(Path::new("/etc")));
}

/// The violations of `runc spec`'s config after `change`.
fn violations(change: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut config: Value = serde_json::from_str(RUNC_SPEC).unwrap();
    change(&mut config);
    let config = BundleConfig::parse(&config.to_string()).unwrap();
    beyond_baseline(config.spec())
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn only(found: Vec<String>, expected: &str) {
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].contains(expected), "{found:#?}");
    assert!(
        found[0].ends_with("allows it with --allow-privileged"),
        "{found:#?}"
    );
}

#[test]
fn runc_spec_is_the_baseline() {
    assert_eq!(violations(|_| {}), Vec::<String>::new());
    // More isolation, and runc's own devices, are within it.
    let found = violations(|c| {
        let namespaces = c["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.push(json!({"type": "cgroup"}));
        namespaces.push(json!({"type": "user"}));
        namespaces.push(json!({"type": "network", "path": ""}));
        c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        c["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        c["linux"]["devices"] = json!([{"path": "/dev/null", "type": "c", "major": 1, "minor": 3}]);
        c["linux"]["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .extend([
                json!({"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm"}),
                json!({"allow": true, "type": "c", "major": 136, "access": "rwm"}),
            ]);
        c["linux"]["maskedPaths"]
            .as_array_mut()
            .unwrap()
            .push("/proc/sys".into());
        c["process"]["capabilities"]["bounding"] = json!(["CAP_KILL"]);
        c["process"]["oomScoreAdj"] = 500.into();
        c["process"]["apparmorProfile"] = "docker-default".into();
        c["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/data", "type": "bind", "source": "/srv"}));
    });
    assert_eq!(found, Vec::<String>::new());
}

#[test]
fn hooks_of_every_stage_are_listed() {
    let found = violations(|c| {
        c["hooks"] = json!({
            "prestart": [{"path": "/bin/a"}],
            "createRuntime": [{"path": "/bin/b"}, {"path": "/bin/c"}],
            "poststop": [{"path": "/bin/d"}],
        });
    });
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(found[0].starts_with("hooks.prestart would run /bin/a as root"));
    assert!(found[2].starts_with("hooks.createRuntime would run /bin/c"));
    assert!(found[3].starts_with("hooks.poststop would run /bin/d"));
}

#[test]
fn extra_capabilities_are_listed_once_with_their_sets() {
    let found = violations(|c| {
        let caps = &mut c["process"]["capabilities"];
        for set in ["bounding", "effective", "permitted"] {
            caps[set]
                .as_array_mut()
                .unwrap()
                .push("CAP_SYS_ADMIN".into());
        }
        caps["ambient"]
            .as_array_mut()
            .unwrap()
            .push("CAP_NET_ADMIN".into());
    });
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].starts_with("capability CAP_NET_ADMIN (in ambient)"),
        "{found:#?}"
    );
    assert!(
        found[1].starts_with("capability CAP_SYS_ADMIN (in bounding, effective, permitted)"),
        "{found:#?}"
    );
}

#[test]
fn host_namespaces_are_refused() {
    let found = violations(|c| {
        let namespaces = c["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.retain(|ns| ns["type"] != "pid");
        namespaces[0]["path"] = "/proc/1/ns/net".into();
    });
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].starts_with("no pid namespace of its own"),
        "{found:#?}"
    );
    assert!(
        found[1].starts_with("joins the existing net namespace /proc/1/ns/net"),
        "{found:#?}"
    );
    assert_eq!(
        violations(|c| c
            .as_object_mut()
            .unwrap()
            .remove("linux")
            .map(drop)
            .unwrap())
        .len(),
        5 + BASE_MASKED_PATHS.len() + BASE_READONLY_PATHS.len()
    );
}

#[test]
fn devices_beyond_runcs_own_are_refused() {
    only(
        violations(|c| {
            c["linux"]["devices"] =
                json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]);
        }),
        "device /dev/sda (b 8:0)",
    );
    only(
        violations(|c| {
            c["linux"]["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
        }),
        "device cgroup rule \"allow a *:* rwm\"",
    );
    only(
        violations(|c| {
            c["linux"]["resources"]["devices"] =
                json!([{"allow": true, "type": "c", "major": 1, "access": "rwm"}]);
        }),
        "allow c 1:* rwm",
    );
}

#[test]
fn kernel_interfaces_are_refused() {
    only(
        violations(|c| c["linux"]["sysctl"] = json!({"kernel.shmmax": "1"})),
        "sysctl kernel.shmmax",
    );
    only(
        violations(|c| c["linux"]["netDevices"] = json!({"eth0": {}})),
        "network interface eth0",
    );
    only(
        violations(|c| {
            c["linux"]["maskedPaths"]
                .as_array_mut()
                .unwrap()
                .retain(|p| p != "/proc/kcore");
        }),
        "/proc/kcore is not in linux.maskedPaths",
    );
    only(
        violations(|c| {
            c["linux"]["readonlyPaths"]
                .as_array_mut()
                .unwrap()
                .retain(|p| p != "/proc/sysrq-trigger");
        }),
        "/proc/sysrq-trigger is in neither",
    );
    only(
        violations(|c| {
            c["linux"]["seccomp"] =
                json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"});
        }),
        "seccomp notifications to /run/agent.sock",
    );
    only(
        violations(|c| c["annotations"] = json!({"org.criu.config": "/tmp/x.conf"})),
        "org.criu.config",
    );
}

#[test]
fn mounts_reaching_the_host_are_refused() {
    let mount = |m: Value| move |c: &mut Value| c["mounts"].as_array_mut().unwrap().push(m);
    only(
        violations(mount(
            json!({"destination": "/p", "type": "proc", "source": "proc"}),
        )),
        "second proc at /p",
    );
    only(
        violations(|c| c["mounts"][5]["options"] = json!(["nosuid"])),
        "mounts sysfs at /sys read-write",
    );
    only(
        violations(mount(
            json!({"destination": "/data", "type": "ext4", "source": "/dev/sda1"}),
        )),
        "mounts a \"ext4\" filesystem at /data",
    );
}

#[test]
fn scheduling_above_the_host_is_refused() {
    let found = violations(|c| {
        c["process"]["oomScoreAdj"] = (-1000).into();
        c["process"]["scheduler"] = json!({"policy": "SCHED_FIFO", "nice": -5});
        c["process"]["ioPriority"] = json!({"class": "IOPRIO_CLASS_RT", "priority": 0});
    });
    assert_eq!(found.len(), 4, "{found:#?}");
    for (line, what) in found.iter().zip([
        "oomScoreAdj -1000",
        "scheduler policy SCHED_FIFO",
        "nice -5",
        "I/O class IOPRIO_CLASS_RT",
    ]) {
        assert!(line.starts_with(what), "{line}");
    }
}
