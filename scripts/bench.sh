#!/usr/bin/env bash
# The migration benchmark (not a test; never part of CI). In one run, side
# by side on the same kind of container (a busybox layer with migrate-heap),
# for each link, heap size and workload, it measures:
#
#   criu-floor        runc checkpoint to tmpfs, runc restore from it, one host
#   tcp-copy          the link's ceiling: a checkpoint's images as one file,
#                     one plain TCP copy (socat) between the hosts
#   criu-page-server  CRIU's own pipeline between the hosts: criu page-server
#                     on the destination, runc checkpoint --page-server on the
#                     source, the other images and the upper dir copied
#                     across, runc restore on the destination
#   manual            what an operator would script: runc checkpoint to
#                     tmpfs, tar | zstd -1 | socat of the images and the
#                     upper dir, socat | zstd -d | tar -x, runc restore
#   migrate MODE      migrate <id> --to 198.18.0.2:7070 --json --mode MODE,
#                     each mode migrate offers (and each --migrate-args
#                     variant); a mode it refuses is reported as unavailable
#                     with migrate's reason
#
# and for every run: the tool's downtime, the downtime the application saw
# (the longest pause between two beats of migrate-heap, from its status file
# on the destination), the total time, the transfer rate, the bytes on the
# wire, the CPU time of each side and a memory check (every page of the heap
# verified on the destination; a failure fails the benchmark). It prints a
# table of medians and writes every figure as JSON. Run as root on Debian 12
# after scripts/setup.sh; see --help.
set -Eeuo pipefail
export LC_ALL=C

caller_dir=$PWD
cd "$(dirname "$0")/.."
repo=$(pwd)
# shellcheck source=scripts/hosts.sh
. scripts/hosts.sh
# shellcheck source=scripts/lib/rootfs.sh
. scripts/lib/rootfs.sh
# shellcheck source=scripts/lib/cleanup.sh
. scripts/lib/cleanup.sh
# shellcheck source=scripts/lib/heap.sh
. scripts/lib/heap.sh
# shellcheck source=scripts/lib/criu.sh
. scripts/lib/criu.sh
# shellcheck source=scripts/lib/cpuacct.sh
. scripts/lib/cpuacct.sh
# shellcheck source=scripts/lib/bench_cases.sh
. scripts/lib/bench_cases.sh
report_py=$repo/scripts/lib/bench_report.py
profile_py=$repo/scripts/lib/bench_profile.py

usage() {
    cat <<'EOF'
usage: scripts/bench.sh [options]

Benchmarks live migration of a migrate-heap container between two
network-namespace hosts: CRIU's floor (checkpoint + restore on one host), a
plain TCP copy of the same bytes, CRIU's page-server pipeline, an operator's
checkpoint | tar | zstd | socat pipeline, and migrate in every mode.
Needs root, CRIU >= 4.2, runc, iproute2 (ip, ss, tc), iptables,
busybox-static, socat, zstd, python3 (scripts/setup.sh installs them), a
cgroup v1 cpuacct hierarchy, and cargo; builds what it runs.

  --links LIST       the link between the hosts: bare (the veth as it is) or
                     a rate tc's tbf takes (1gbit, 100mbit), shaping both
                     ends of the veth (default bare)
  --sizes LIST       heap sizes, comma-separated (default 64M,512M,2G)
  --workloads LIST   idle, dirty or both (default idle,dirty)
  --dirty-rate RATE  bytes/s the dirty workload rewrites (default 16M)
  --runs N           runs of every case (default 3); the table shows medians
  --cases LIST       floor, tcp-copy, page-server, manual, migrate (default:
                     all)
  --modes LIST       migrate modes to try (default
                     stop-and-copy,post-copy,pre-copy,hybrid)
  --migrate-args 'NAME=ARGS;NAME2=ARGS2'
                     extra migrate variants, each run in every mode next to
                     migrate as it comes, as "migrate MODE NAME"; ARGS are
                     split on spaces (no quoting), e.g.
                     'zstd=--compression zstd;capped=--max-bandwidth 50MiB';
                     repeatable; a variant migrate refuses is unavailable
  --warmup SECS      how long the heap runs before it is moved (default 2)
  --out FILE         the JSON results (default target/bench/bench-<time>.json)
  --quick            a smoke run: --sizes 64M --runs 1
  --profile          also record every CPU with perf (linux-perf) through the
                     run, and add to each case where its CPU time went: the
                     seconds of each process and kernel thread in the case's
                     CPU window (each CRIU process apart, dump before
                     restore), with their top functions; printed and in the
                     JSON as "profile"
  -h, --help         this text

Figures, per case:
  downtime   freeze (CRIU's pre-dump action) to restored and running on the
             destination; migrate's own downtime_ms; none for tcp-copy
  total      the case's start to the end of its restore (migrate: total_ms)
  transfer   raw bytes / transfer time: tcp-copy the file / the copy;
             manual images + upper dir / the tar|zstd|socat stream;
             page-server images + upper dir / checkpoint (pages cross while
             CRIU dumps) and the copy of the rest; migrate bytes_raw / the
             rounds' transfer_s; the floor has none. Ratio to tcp-copy.
  wire       tcp-copy and manual the bytes through socat (manual: after
             zstd); page-server the veth's counters plus the copied files;
             migrate its bytes_wire (UDP payload)
  CPU        user + system seconds from cgroup v1 cpuacct, from the case's
             start to the end of its restore, per side. Source: the tools
             (runc checkpoint and CRIU, tar, zstd, socat, migrate) and the
             container's own cgroup (its workload until frozen and CRIU's
             parasite code, which runs in its tasks). Destination: the tools
             (runc restore, criu page-server, zstd -d, tar, socat,
             migrate-dst, its CRIU lazy-pages) and the restored container's
             cgroup (CRIU's restore, which runc runs there, and the workload
             once it runs). The floor's checkpoint counts on the source, its
             restore (same host) on the destination; page-server's local cp
             of the other images and the upper dir on the destination.
             Not counted: this script, the heap checks, anything between
             cases, and the kernel's network work when it runs as a
             softirq while a task outside these cgroups is current.

JSON: {"meta": {...}, "runs": [one object per case and run, raw figures and
migrate's whole --json object], "summary": [medians per link, size, workload
and case, with ratios to the floor and to tcp-copy]}. Times are ms, sizes
bytes, CPU seconds.
EOF
}

die() {
    echo "bench.sh: $*" >&2
    exit 1
}

links=bare
sizes=64M,512M,2G
workloads=idle,dirty
dirty_rate=16M
runs=3
cases=floor,tcp-copy,page-server,manual,migrate
modes=stop-and-copy,post-copy,pre-copy,hybrid
migrate_args=
warmup=2
out=
profile=0
while [ $# -gt 0 ]; do
    arg=$1
    shift
    case $arg in
        --*=*)
            set -- "${arg%%=*}" "${arg#*=}" "$@"
            continue
            ;;
        -h | --help) usage; exit 0 ;;
        --quick) sizes=64M runs=1 ;;
        --profile) profile=1 ;;
        --links | --sizes | --workloads | --dirty-rate | --runs | --cases | --modes | --migrate-args | --warmup | --out)
            [ $# -gt 0 ] || die "$arg needs a value (see --help)"
            case $arg in
                --links) links=$1 ;;
                --migrate-args) migrate_args=${migrate_args:+$migrate_args;}$1 ;;
                --sizes) sizes=$1 ;;
                --workloads) workloads=$1 ;;
                --dirty-rate) dirty_rate=$1 ;;
                --runs) runs=$1 ;;
                --cases) cases=$1 ;;
                --modes) modes=$1 ;;
                --warmup) warmup=$1 ;;
                --out) out=$1 ;;
            esac
            shift
            ;;
        *) die "unknown argument $arg (see --help)" ;;
    esac
done

IFS=, read -ra link_list <<<"$links"
IFS=, read -ra size_list <<<"$sizes"
IFS=, read -ra workload_list <<<"$workloads"
IFS=, read -ra case_list <<<"$cases"
IFS=, read -ra mode_list <<<"$modes"
[ "${#link_list[@]}" -gt 0 ] || die "--links is empty"
for l in "${link_list[@]}"; do
    [[ $l =~ ^(bare|[1-9][0-9]*[kmg]?bit)$ ]] || die "--links: $l is neither bare nor a rate like 1gbit"
done
[ "${#size_list[@]}" -gt 0 ] || die "--sizes is empty"
for s in "${size_list[@]}"; do
    [[ $s =~ ^[0-9]+[KMG]$ ]] || die "--sizes: $s is not a size like 64M or 2G"
done
for w in "${workload_list[@]}"; do
    [[ $w =~ ^(idle|dirty)$ ]] || die "--workloads: $w is neither idle nor dirty"
done
for c in "${case_list[@]}"; do
    [[ $c =~ ^(floor|tcp-copy|page-server|manual|migrate)$ ]] || die "--cases: unknown case $c"
done
# The variants: names and argument strings, in the order given.
variant_names=() variant_args=()
IFS=';' read -ra variant_list <<<"$migrate_args"
for v in "${variant_list[@]}"; do
    [ -n "$v" ] || continue
    [[ $v == *=* ]] || die "--migrate-args: $v is not NAME=ARGS"
    [[ ${v%%=*} =~ ^[a-z][a-z0-9-]*$ ]] || die "--migrate-args: ${v%%=*} is not a name like zstd (a-z, 0-9, -)"
    for n in "${variant_names[@]}"; do
        [ "$n" != "${v%%=*}" ] || die "--migrate-args: $n given twice"
    done
    variant_names+=("${v%%=*}")
    variant_args+=("${v#*=}")
done
for m in "${mode_list[@]}"; do
    [[ $m =~ ^[a-z-]+$ ]] || die "--modes: $m is not a mode name"
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive number"
[[ $warmup =~ ^[0-9]+$ ]] || die "--warmup must be whole seconds"
[[ $dirty_rate =~ ^[0-9]+[KMG]?$ ]] || die "--dirty-rate: $dirty_rate is not a rate like 16M"
# --out is relative to where the script was started, not to the repo.
[ -z "$out" ] || [[ $out == /* ]] || out=$caller_dir/$out

size_bytes() {
    local n=${1%[KMG]}
    case $1 in
        *K) echo $((n << 10)) ;;
        *M) echo $((n << 20)) ;;
        *G) echo $((n << 30)) ;;
        *) echo "$n" ;;
    esac
}

# Prerequisites: fail, never skip.
[ "$(id -u)" -eq 0 ] || die "must run as root (CRIU, runc, namespaces, mounts)"
for tool in criu:criu runc:runc ip:iproute2 ss:iproute2 tc:iproute2 nsenter:util-linux \
    setsid:util-linux iptables-restore:iptables python3:python3 cargo:rustup ldd:libc-bin \
    socat:socat zstd:zstd tar:tar dd:coreutils; do
    command -v "${tool%%:*}" >/dev/null ||
        die "${tool%%:*} is missing: install ${tool#*:} (scripts/setup.sh installs the runtime dependencies)"
done
[ -x /bin/busybox ] || die "/bin/busybox is missing: install busybox-static (scripts/setup.sh does)"
criu_version=$(criu --version | sed -n 's/^Version: *//p')
[[ $criu_version =~ ^([0-9]+)\.([0-9]+) ]] || die "cannot read CRIU's version ($criu_version)"
if [ "${BASH_REMATCH[1]}" -lt 4 ] || { [ "${BASH_REMATCH[1]}" -eq 4 ] && [ "${BASH_REMATCH[2]}" -lt 2 ]; }; then
    die "CRIU >= 4.2 is needed, found $criu_version: run scripts/setup.sh"
fi
criu check >/dev/null 2>&1 || die "criu check fails on this kernel (run it to see why)"
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null ||
    die "the kernel has no overlay filesystem"
cpuacct_root >/dev/null || die "the CPU figures need cgroup v1's cpuacct controller mounted"
if [ "$profile" -eq 1 ]; then
    command -v perf >/dev/null || die "--profile needs perf: install linux-perf (scripts/setup.sh does)"
fi

# Unique names: namespaces, veths, cgroups and dirs cannot collide with the
# tests' (me<n>s, ve<n>s, migrate-e2e-*) or another benchmark's.
tag=mb$$
cg_src=migrate-bench-$$-src
cg_dst=migrate-bench-$$-dst
migrate_port=7070
page_server_port=7171
manual_port=7272
tcp_copy_port=7373
settle_ms=500

# What the trap undoes.
dir=
children=()
groups=() # process groups (setsid): every process of each is ended
hosts_made=0
shaped=0
old_pipe_max=

# The link between the hosts: bare, or shaped by tbf to a rate on both
# ends of the veth (each end shapes what it sends).
link_unshape() {
    [ "$shaped" -eq 1 ] || return 0
    tc -n "$tag-src" qdisc del dev "$tag-s" root 2>/dev/null || true
    tc -n "$tag-dst" qdisc del dev "$tag-d" root 2>/dev/null || true
    shaped=0
}

link_shape() {
    local rate=$1
    link_unshape
    [ "$rate" = bare ] && return 0
    shaped=1
    tc -n "$tag-src" qdisc add dev "$tag-s" root tbf rate "$rate" burst 256kb latency 10ms
    tc -n "$tag-dst" qdisc add dev "$tag-d" root tbf rate "$rate" burst 256kb latency 10ms
}

# The system-wide profile (--profile): perf from the warm-up to the end.
profiler=
profile_start() {
    perf record -a -F 499 -k CLOCK_REALTIME -q -o "$dir/perf.data" >"$dir/perf.log" 2>&1 &
    profiler=$!
    children+=("$profiler")
}

profile_attach() {
    [ -n "$profiler" ] || return 0
    kill -INT "$profiler" 2>/dev/null || true
    wait "$profiler" 2>/dev/null || true
    profiler=
    say "profile: where each case's CPU time went"
    perf script -i "$dir/perf.data" -F pid,tid,comm,time,period,ip,sym,dso 2>/dev/null >"$dir/perf.txt"
    python3 "$profile_py" attach "$dir/runs.jsonl" "$dir/perf.txt"
}

finish_report() {
    [ -n "$dir" ] && [ -s "$dir/runs.jsonl" ] && [ -s "$dir/meta.json" ] || return 0
    mkdir -p "$(dirname "$out")"
    python3 "$report_py" report "$dir/runs.jsonl" "$dir/meta.json" "$out"
    echo "raw figures: $out" >&2
}

cleanup() {
    local rc=$? pid root
    set +eE
    trap - EXIT INT TERM ERR
    if [ "$rc" -ne 0 ] && [ -n "$dir" ] && [ -s "$dir/runs.jsonl" ]; then
        echo "bench.sh: failed (exit $rc); the runs so far:" >&2
        finish_report
    fi
    for pid in "${groups[@]}"; do
        stop_group "$pid"
    done
    for pid in "${children[@]}"; do
        stop_child "$pid"
    done
    if [ -n "$dir" ]; then
        for root in "$dir"/runc-*; do
            runc_remove_all "$root"
        done
        # Overlays, CRIU's leftovers, then the tmpfs itself.
        unmount_under "$dir"
    fi
    [ "$hosts_made" -eq 1 ] && link_unshape && hosts_down "$tag"
    cgroup_remove "$cg_src"
    cgroup_remove "$cg_dst"
    [ -n "$old_pipe_max" ] && echo "$old_pipe_max" >/proc/sys/fs/pipe-max-size
    if [ -n "$dir" ]; then
        if awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
            echo "bench.sh: mounts left under $dir, not removing it" >&2
        else
            rm -rf "$dir"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'echo "bench.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR

say() { printf '== %s\n' "$*" >&2; }

say "building migrate, migrate-dst, migrate-heap (release)"
cargo build --release --quiet -p migrate-src -p migrate-dst -p migrate-heap
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target_dir/release
[ -n "$out" ] || out=$target_dir/bench/bench-$(date +%Y%m%d-%H%M%S).json
has_mode_flag=0
"$bin/migrate" --help | grep -q -- '--mode' && has_mode_flag=1

dir=$(mktemp -d /tmp/migrate-bench.XXXXXX)
# Everything on one tmpfs: images (as migrate's default work dir is), the
# upper dirs, the destination's state; one umount undoes it.
mount -t tmpfs -o mode=0700,size=60% migrate-bench "$dir"

# CRIU's lazy pages (post-copy) need pipes of 4 MiB.
old_pipe_max=$(cat /proc/sys/fs/pipe-max-size)
[ "$old_pipe_max" -ge 4194304 ] || echo 4194304 >/proc/sys/fs/pipe-max-size

say "two hosts: $tag-src ($SRC_ADDR) and $tag-dst ($DST_ADDR)"
hosts_made=1
hosts_up "$tag"

# Each side's CPU time: its tools in <side>/tools, its containers in
# <side>/<id> (runc makes those).
cpuacct_make "$cg_src/tools"
cpuacct_make "$cg_dst/tools"

"$bin/migrate" certs ca --out "$dir/ca" >/dev/null
"$bin/migrate" certs issue --ca "$dir/ca" --name "$DST_ADDR" --role destination --out "$dir/tls-dst" >/dev/null
"$bin/migrate" certs issue --ca "$dir/ca" --name "$SRC_ADDR" --role source --out "$dir/tls-src" >/dev/null

make_busybox_rootfs "$dir/layer"
rootfs_install_binary "$dir/layer" "$bin/migrate-heap"

veth_bytes() {
    ip -n "$tag-src" -j -s link show "$tag-s" |
        python3 -c 'import json, sys; s = json.load(sys.stdin)[0]["stats64"]; print(s["rx"]["bytes"] + s["tx"]["bytes"])'
}

json_get() {
    python3 -c 'import json, sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print("null" if v is None else json.dumps(v))' "$1" "$2"
}

# Prints the last lines of a log, indented, for failure messages.
show_log() {
    local file=$1
    [ -s "$file" ] || return 0
    echo "--- $file (last 30 lines)" >&2
    tail -n 30 "$file" | sed 's/^/    /' >&2
}

start_migrate_dst() {
    # A subshell that execs nsenter, which execs the daemon: $! is the
    # daemon's pid (a function in the background would fork once more).
    (
        cpuacct_join "$cg_dst/tools"
        exec nsenter --net="/run/netns/$tag-dst" "$bin/migrate-dst" --listen "$DST_ADDR:$migrate_port" \
            --tls-dir "$dir/tls-dst" --state-dir "$dir/mdst-state" --runc-root "$dir/runc-mdst" \
            --allow "$SRC_ADDR" --cgroup-parent "/$cg_dst"
    ) </dev/null >/dev/null 2>"$dir/migrate-dst.log" &
    local pid=$!
    children+=("$pid")
    local i
    for ((i = 0; i < 100; i++)); do
        grep -q listening "$dir/migrate-dst.log" 2>/dev/null && return 0
        child_alive "$pid" || break
        sleep 0.1
    done
    show_log "$dir/migrate-dst.log"
    die "migrate-dst did not start listening on $DST_ADDR:$migrate_port"
}

write_meta() {
    python3 "$report_py" record "$dir/meta.json" \
        started_at="$(date -Iseconds)" \
        commit="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)" \
        kernel="$(uname -r)" criu="$criu_version" \
        runc="$(runc --version | head -n1)" \
        cpus="$(nproc)" mem_total_kib="$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)" \
        links="$links" sizes="$sizes" workloads="$workloads" dirty_rate="$dirty_rate" \
        dirty_bytes_per_sec="$(size_bytes "$dirty_rate")" runs="$runs" cases="$cases" \
        modes="$modes" migrate_args="$migrate_args" warmup_s="$warmup" beat_ms=10 settle_ms="$settle_ms" \
        profile="$profile" \
        migrate_has_mode_flag="$has_mode_flag"
}

write_meta
say "destination daemon on $DST_ADDR:$migrate_port"
start_migrate_dst

run_cases() {
    local c m i
    for c in "${case_list[@]}"; do
        case $c in
            floor) run_floor ;;
            tcp-copy) run_tcp_copy ;;
            page-server) run_page_server ;;
            manual) run_manual ;;
            migrate)
                for m in "${mode_list[@]}"; do
                    run_migrate "$m"
                    for i in "${!variant_names[@]}"; do
                        run_migrate "$m" "${variant_names[$i]}" "${variant_args[$i]}"
                    done
                done
                ;;
        esac
    done
}

# One unrecorded round on a small heap first: the first checkpoint, restore
# and migration of a run pay for cold caches (and migrate sends the layer).
[ "$profile" -eq 0 ] || profile_start
say "warm-up round (16M, idle; not recorded)"
warming=1 c_link=bare c_size=16M c_workload=idle c_run=0
run_cases
warming=0

for c_link in "${link_list[@]}"; do
    say "link: $c_link"
    link_shape "$c_link"
    for c_size in "${size_list[@]}"; do
        for c_workload in "${workload_list[@]}"; do
            for ((c_run = 1; c_run <= runs; c_run++)); do
                run_cases
            done
        done
    done
done
link_unshape

profile_attach
finish_report
