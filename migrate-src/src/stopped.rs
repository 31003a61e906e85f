//! Stopped tasks, found before anything is frozen: `runc checkpoint` of a
//! container with a task stopped by SIGSTOP (or held by a debugger) does not
//! fail, it hangs until killed, so the source refuses such a container and
//! names the tasks.

use std::fmt;
use std::path::PathBuf;

/// A task of the container that is stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppedTask {
    /// As this host sees it.
    pub pid: u32,
    /// As the container sees it (its pid namespace), if the kernel says.
    pub pid_in_container: Option<u32>,
    pub name: String,
    /// Held by a debugger (`t`, tracing stop) rather than stopped by a
    /// signal (`T`).
    pub traced: bool,
}

impl fmt::Display for StoppedTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if let Some(inner) = self.pid_in_container {
            write!(f, " ({inner} in the container)")?;
        }
        let why = if self.traced {
            "held by a debugger"
        } else {
            "stopped"
        };
        write!(f, " {}, {why}", self.name)
    }
}

/// The task `pid` describes in its /proc/PID/status text, if it is stopped.
pub fn stopped_in_status(pid: u32, status: &str) -> Option<StoppedTask> {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let traced = match field("State:")?.chars().next()? {
        'T' => false,
        't' => true,
        _ => return None,
    };
    Some(StoppedTask {
        pid,
        // The innermost namespace's pid is the last one listed.
        pid_in_container: field("NSpid:")
            .and_then(|pids| pids.split_whitespace().last())
            .and_then(|p| p.parse().ok()),
        name: field("Name:").unwrap_or_default().to_owned(),
        traced,
    })
}

/// Where the processes of `pid`'s cgroup are listed, from its
/// /proc/PID/cgroup text: the v1 freezer's entry, the hierarchy runc freezes
/// (a hybrid host lists a unified entry too), else the unified hierarchy's
/// (cgroup v2).
pub fn cgroup_procs_file(proc_cgroup: &str) -> Option<PathBuf> {
    let mut unified = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "freezer") {
            let freezer = PathBuf::from("/sys/fs/cgroup/freezer").join(path);
            return Some(freezer.join("cgroup.procs"));
        }
        if controllers.is_empty() {
            unified = Some(
                PathBuf::from("/sys/fs/cgroup")
                    .join(path)
                    .join("cgroup.procs"),
            );
        }
    }
    unified
}

/// The stopped tasks among the processes of `init_pid`'s cgroup (the
/// container's). A process that ends while we look is no longer a concern.
pub fn stopped_tasks(init_pid: u32) -> std::io::Result<Vec<StoppedTask>> {
    let cgroup = std::fs::read_to_string(format!("/proc/{init_pid}/cgroup"))?;
    let pids = match cgroup_procs_file(&cgroup) {
        Some(procs) => std::fs::read_to_string(procs)?
            .lines()
            .filter_map(|p| p.trim().parse().ok())
            .collect(),
        None => vec![init_pid],
    };
    Ok(pids
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            stopped_in_status(pid, &status)
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const STOPPED: &str = "Name:\tsleep\nUmask:\t0022\nState:\tT (stopped)\nTgid:\t4242\n\
                           Pid:\t4242\nPPid:\t4200\nNSpid:\t4242\t7\n";

    #[test]
    fn finds_a_task_stopped_by_a_signal() {
        let task = stopped_in_status(4242, STOPPED).unwrap();
        assert_eq!(
            task,
            StoppedTask {
                pid: 4242,
                pid_in_container: Some(7),
                name: "sleep".into(),
                traced: false,
            }
        );
        assert_eq!(
            task.to_string(),
            "pid 4242 (7 in the container) sleep, stopped"
        );
    }

    #[test]
    fn tells_a_debugger_stop_and_ignores_running_and_sleeping_tasks() {
        let traced = STOPPED.replace("T (stopped)", "t (tracing stop)");
        assert!(stopped_in_status(1, &traced).unwrap().traced);
        for state in [
            "R (running)",
            "S (sleeping)",
            "D (disk sleep)",
            "Z (zombie)",
        ] {
            let status = STOPPED.replace("T (stopped)", state);
            assert_eq!(stopped_in_status(1, &status), None, "{state}");
        }
        assert_eq!(stopped_in_status(1, "Name:\tx\n"), None);
    }

    #[test]
    fn finds_the_containers_process_list() {
        assert_eq!(
            cgroup_procs_file("0::/m-src/c1\n").unwrap(),
            PathBuf::from("/sys/fs/cgroup/m-src/c1/cgroup.procs")
        );
        let v1 = "7:memory:/m/c1\n4:freezer:/m/c1\n1:name=systemd:/m/c1\n0::/m/c1\n";
        assert_eq!(
            cgroup_procs_file(v1).unwrap(),
            PathBuf::from("/sys/fs/cgroup/freezer/m/c1/cgroup.procs")
        );
        assert_eq!(cgroup_procs_file("7:memory:/m/c1\n"), None);
    }
}
