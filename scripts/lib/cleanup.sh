# shellcheck shell=bash
# Removing what a script started: its child processes (by pid), the
# containers of a runc root, the mounts under a dir, a cgroup in every
# hierarchy. Each function is idempotent and returns 0 whatever state it
# finds, so that an EXIT trap can call them after any failure. Sourced.
#
#   child_alive PID             whether PID is a live child of this shell
#   stop_child PID [SECS]       SIGTERM, then SIGKILL after SECS (default 5)
#   stop_group PID [SECS]       the same for the process group PID leads
#                               (a child started with setsid)
#   unmount_under DIR           unmounts DIR and everything below it, deepest first
#   runc_remove ROOT ID         kills container ID of runc root ROOT, deletes it
#   runc_remove_all ROOT        the same for every container of ROOT
#   cgroup_remove NAME          removes /NAME (and what is below) in every hierarchy

# A pid is checked to be our own live child before it is signalled, so a
# pid the kernel has since given to another process is never touched.
child_alive() {
    local pid=$1 state ppid
    [ -n "$pid" ] && [ -r "/proc/$pid/status" ] || return 1
    state=$(awk '/^State:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)
    ppid=$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)
    [ "$ppid" = "$$" ] && [ -n "$state" ] && [ "$state" != Z ]
}

stop_child() {
    local pid=$1 secs=${2:-5} i
    if child_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < secs * 10; i++)); do
            child_alive "$pid" || break
            sleep 0.1
        done
        child_alive "$pid" && kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true
}

# The group is signalled only while its leader is our live child: until
# then no other process can have been given its id.
stop_group() {
    local pid=$1 secs=${2:-5} i
    if child_alive "$pid"; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for ((i = 0; i < secs * 10; i++)); do
            child_alive "$pid" || break
            sleep 0.1
        done
        child_alive "$pid" && kill -KILL -- "-$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true
}

unmount_under() {
    local dir=${1%/} mnt
    [ -n "$dir" ] || return 0
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r mnt; do
        umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    done
}

runc_remove() {
    local root=$1 id=$2 i
    [ -d "$root/$id" ] || return 0
    runc --root "$root" kill "$id" KILL >/dev/null 2>&1 || true
    for ((i = 0; i < 50; i++)); do
        runc --root "$root" state "$id" 2>/dev/null | grep -q '"status": *"running"' || break
        sleep 0.1
    done
    # CRIU's leftover mounts under runc's state dir first: runc delete
    # removes the dir through them otherwise.
    unmount_under "$root/$id"
    runc --root "$root" delete --force "$id" >/dev/null 2>&1 || true
}

runc_remove_all() {
    local root=$1 dir
    [ -d "$root" ] || return 0
    for dir in "$root"/*/; do
        [ -d "$dir" ] && runc_remove "$root" "$(basename "$dir")"
    done
    return 0
}

cgroup_remove() {
    local name=${1#/} base
    [ -n "$name" ] || return 0
    for base in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
        [ -d "$base$name" ] || continue
        find "$base$name" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    return 0
}
