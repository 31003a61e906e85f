# shellcheck shell=bash
# CPU time of groups of processes, from cgroup v1's cpuacct controller: a
# process joins a cgroup, its children are born in it, and the cgroup's
# cpuacct.usage counts the CPU time (user and system, in ns) of everything in
# it and below it, for good: the count keeps what a child cgroup used after
# that child is removed. Sourced.
#
#   cpuacct_root               the cpuacct hierarchy's mount point (fails on
#                              a machine without one, e.g. cgroup v2 only)
#   cpuacct_make GROUP         creates cgroup GROUP (a path like a/b)
#   cpuacct_join GROUP         moves this (sub)shell into GROUP; run it first
#                              in a ( ... ) subshell, then exec or run the
#                              command whose CPU time GROUP should count
#   cpuacct_usage_ns GROUP     GROUP's cpuacct.usage
#
# Removing GROUP is cleanup.sh's cgroup_remove, once no process is left in it.

cpuacct_root() {
    # /proc/self/mountinfo: field 5 the mount point, after " - " the type
    # and the super options, which name the controllers ("rw,cpu,cpuacct").
    local root
    root=$(awk '{
        for (i = 7; $i != "-"; i++) {}
        if ($(i + 1) == "cgroup" && ("," $(i + 3) ",") ~ /,cpuacct,/) { print $5; exit }
    }' /proc/self/mountinfo)
    [ -n "$root" ] || { echo "no cgroup v1 cpuacct hierarchy is mounted" >&2; return 1; }
    echo "$root"
}

cpuacct_make() {
    mkdir -p "$(cpuacct_root)/${1#/}"
}

cpuacct_join() {
    echo "$BASHPID" >"$(cpuacct_root)/${1#/}/cgroup.procs"
}

cpuacct_usage_ns() {
    cat "$(cpuacct_root)/${1#/}/cpuacct.usage"
}
