//! The packet filters of a container's network namespace around a
//! migration, through `iptables` and `ip6tables` run there: CRIU's network
//! lock, which a failed lazy dump leaves behind, and our own guard that
//! keeps the namespace from resetting connections while they are restored.
//!
//! Every call passes `-w`: the host's other users of iptables (CRIU's lock,
//! a firewall) take the same xtables lock.

use super::{in_netns, NetnsError};
use crate::process::run;

/// CRIU's network lock: drops every packet not marked by CRIU.
const CRIU_CHAIN: &str = "CRIU";
/// Ours, from the hook until the restore returns.
const GUARD_CHAIN: &str = "MIGRATE-RESTORE";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// `program -w ARGS` in the network namespace of `pid`.
fn iptables(pid: u32, family: Family, args: &[&str]) -> Result<String, crate::process::ToolError> {
    run(in_netns(pid, family.program()).arg("-w").args(args))
}

/// Removes CRIU's network lock from the network namespace of `pid`: the
/// `CRIU` chain that drops every packet not marked by CRIU, jumped to from
/// INPUT and OUTPUT, for IPv4 and IPv6. CRIU removes it itself after a dump
/// it resumes from, except when a lazy dump's page transfer fails: it has
/// already decided to keep the lock (the copy was meant to live elsewhere)
/// and never takes it off. Returns whether a lock was found.
pub fn remove_criu_network_lock(pid: u32) -> Result<bool, NetnsError> {
    remove_chain(pid, CRIU_CHAIN, &["INPUT", "OUTPUT"])
}

/// Drops, in the network namespace of `pid`, what it would send to tell a
/// client its connection is gone: TCP resets, and ICMP and ICMPv6
/// destination-unreachable (a host that does not forward sends no other
/// ICMP errors). Between the hook and CRIU's own lock a client's
/// retransmission finds the address there and the socket not yet, and the
/// reset would end a connection the restore is about to bring back. Lifted
/// by [`lift_reset_guard`] when the restore returns; a guard left from an
/// earlier attempt is replaced.
pub fn guard_resets(pid: u32) -> Result<(), NetnsError> {
    lift_reset_guard(pid)?;
    let applied = Family::BOTH.into_iter().try_for_each(|family| {
        guard_rules(family)
            .iter()
            .try_for_each(|args| iptables(pid, family, args).map(drop))
    });
    if let Err(e) = applied {
        // Half a guard is no guard: leave none rather than a partial one.
        if let Err(lift) = lift_reset_guard(pid) {
            tracing::warn!("removing a partial reset guard: {lift}");
        }
        return Err(e.into());
    }
    Ok(())
}

/// Removes the guard of [`guard_resets`]; whether there was one.
pub fn lift_reset_guard(pid: u32) -> Result<bool, NetnsError> {
    remove_chain(pid, GUARD_CHAIN, &["OUTPUT"])
}

/// The commands that make the guard for `family`, each the arguments after
/// `iptables -w`: the chain and its rules first, the jump to it last, so
/// that packets meet the chain only once it is complete.
fn guard_rules(family: Family) -> [Vec<&'static str>; 4] {
    let icmp_unreachable = match family {
        Family::V4 => vec![
            "-A",
            GUARD_CHAIN,
            "-p",
            "icmp",
            "--icmp-type",
            "destination-unreachable",
            "-j",
            "DROP",
        ],
        Family::V6 => vec![
            "-A",
            GUARD_CHAIN,
            "-p",
            "ipv6-icmp",
            "--icmpv6-type",
            "destination-unreachable",
            "-j",
            "DROP",
        ],
    };
    [
        vec!["-N", GUARD_CHAIN],
        vec![
            "-A",
            GUARD_CHAIN,
            "-p",
            "tcp",
            "--tcp-flags",
            "RST",
            "RST",
            "-j",
            "DROP",
        ],
        icmp_unreachable,
        // First in OUTPUT: a rule that accepts would otherwise let the
        // reset out before it reaches ours.
        vec!["-I", "OUTPUT", "1", "-j", GUARD_CHAIN],
    ]
}

/// The jump from `hook` to `chain`, checked (`-C`) or deleted (`-D`).
fn jump<'a>(op: &'a str, hook: &'a str, chain: &'a str) -> [&'a str; 4] {
    [op, hook, "-j", chain]
}

/// Removes `chain` and the jumps to it from `hooks`, for IPv4 and IPv6;
/// whether any of them was there.
fn remove_chain(pid: u32, chain: &str, hooks: &[&str]) -> Result<bool, NetnsError> {
    let mut found = false;
    for family in Family::BOTH {
        let table = |args: &[&str]| iptables(pid, family, args);
        for hook in hooks {
            // Repeat: the iptables-nft backend may hold the jump more than once.
            while table(&jump("-C", hook, chain)).is_ok() {
                found = true;
                table(&jump("-D", hook, chain))?;
            }
        }
        if table(&["-S", chain]).is_ok() {
            found = true;
            table(&["-F", chain])?;
            table(&["-X", chain])?;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_drops_resets_and_unreachables_and_is_jumped_to_last() {
        let v4 = guard_rules(Family::V4).map(|r| r.join(" "));
        assert_eq!(
            v4,
            [
                "-N MIGRATE-RESTORE",
                "-A MIGRATE-RESTORE -p tcp --tcp-flags RST RST -j DROP",
                "-A MIGRATE-RESTORE -p icmp --icmp-type destination-unreachable -j DROP",
                "-I OUTPUT 1 -j MIGRATE-RESTORE",
            ]
        );
        let v6 = guard_rules(Family::V6).map(|r| r.join(" "));
        assert_eq!(
            v6[2],
            "-A MIGRATE-RESTORE -p ipv6-icmp --icmpv6-type destination-unreachable -j DROP"
        );
        assert_eq!(v6[3], v4[3]);
        assert_eq!(Family::V6.program(), "ip6tables");
    }

    #[test]
    fn a_jump_is_checked_and_deleted_as_it_was_inserted() {
        assert_eq!(
            jump("-D", "OUTPUT", GUARD_CHAIN),
            ["-D", "OUTPUT", "-j", "MIGRATE-RESTORE"]
        );
        assert_eq!(
            jump("-C", "INPUT", CRIU_CHAIN),
            ["-C", "INPUT", "-j", "CRIU"]
        );
    }
}
