#!/usr/bin/env bash
# The migration benchmark (not a test; never part of CI). In one run, side
# by side on the same kind of container (a busybox layer with migrate-heap),
# for each heap size and workload, it measures:
#
#   criu-floor        runc checkpoint to tmpfs, runc restore from it, one host
#   criu-page-server  CRIU's own pipeline between the hosts: criu page-server
#                     on the destination, runc checkpoint --page-server on the
#                     source, the other images and the upper dir copied
#                     across, runc restore on the destination
#   migrate MODE      migrate <id> --to 198.18.0.2:7070 --json --mode MODE,
#                     each mode migrate offers; a mode it refuses is reported
#                     as unavailable with migrate's reason
#
# and for every run: the tool's downtime, the downtime the application saw
# (the longest pause between two beats of migrate-heap, from its status file
# on the destination), the total time, the bytes on the wire, and a memory
# check (every page of the heap verified on the destination; a failure
# fails the benchmark). It prints a table of medians and writes every figure
# as JSON. Run as root on Debian 12 after scripts/setup.sh; see --help.
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
report_py=$repo/scripts/lib/bench_report.py

usage() {
    cat <<'EOF'
usage: scripts/bench.sh [options]

Benchmarks live migration of a migrate-heap container between two
network-namespace hosts: CRIU's floor (checkpoint + restore on one host),
CRIU's page-server pipeline between the hosts, and migrate in every mode.
Needs root, CRIU >= 4.2, runc, iproute2, iptables, busybox-static, python3
(scripts/setup.sh installs them) and cargo; builds what it runs.

  --sizes LIST       heap sizes, comma-separated (default 512M,2G)
  --workloads LIST   idle, dirty or both (default idle,dirty)
  --dirty-rate RATE  bytes/s the dirty workload rewrites (default 16M)
  --runs N           runs of every case (default 3); the table shows medians
  --cases LIST       floor, page-server, migrate (default: all three)
  --modes LIST       migrate modes to try (default
                     stop-and-copy,post-copy,pre-copy,hybrid)
  --warmup SECS      how long the heap runs before it is moved (default 2)
  --out FILE         the JSON results (default target/bench/bench-<time>.json)
  --quick            a smoke run: --sizes 64M --runs 1
  -h, --help         this text

JSON: {"meta": {...}, "runs": [one object per case and run, raw figures and
migrate's whole --json object], "summary": [medians per size, workload and
case, with ratios to the floor]}. Times are ms, sizes bytes.
EOF
}

die() {
    echo "bench.sh: $*" >&2
    exit 1
}

sizes=512M,2G
workloads=idle,dirty
dirty_rate=16M
runs=3
cases=floor,page-server,migrate
modes=stop-and-copy,post-copy,pre-copy,hybrid
warmup=2
out=
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
        --sizes | --workloads | --dirty-rate | --runs | --cases | --modes | --warmup | --out)
            [ $# -gt 0 ] || die "$arg needs a value (see --help)"
            case $arg in
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

IFS=, read -ra size_list <<<"$sizes"
IFS=, read -ra workload_list <<<"$workloads"
IFS=, read -ra case_list <<<"$cases"
IFS=, read -ra mode_list <<<"$modes"
[ "${#size_list[@]}" -gt 0 ] || die "--sizes is empty"
for s in "${size_list[@]}"; do
    [[ $s =~ ^[0-9]+[KMG]$ ]] || die "--sizes: $s is not a size like 64M or 2G"
done
for w in "${workload_list[@]}"; do
    [[ $w =~ ^(idle|dirty)$ ]] || die "--workloads: $w is neither idle nor dirty"
done
for c in "${case_list[@]}"; do
    [[ $c =~ ^(floor|page-server|migrate)$ ]] || die "--cases: unknown case $c"
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
for tool in criu:criu runc:runc ip:iproute2 ss:iproute2 nsenter:util-linux \
    iptables-restore:iptables python3:python3 cargo:rustup ldd:libc-bin; do
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

# Unique names: namespaces, veths, cgroups and dirs cannot collide with the
# tests' (me<n>s, ve<n>s, migrate-e2e-*) or another benchmark's.
tag=mb$$
cg_src=migrate-bench-$$-src
cg_dst=migrate-bench-$$-dst
migrate_port=7070
page_server_port=7171
settle_ms=500

# What the trap undoes.
dir=
children=()
hosts_made=0
old_pipe_max=

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
    [ "$hosts_made" -eq 1 ] && hosts_down "$tag"
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
    # nsenter itself in the background (it execs the daemon): a function in
    # the background would be a subshell whose pid is not the daemon's.
    nsenter --net="/run/netns/$tag-dst" "$bin/migrate-dst" --listen "$DST_ADDR:$migrate_port" \
        --tls-dir "$dir/tls-dst" --state-dir "$dir/mdst-state" --runc-root "$dir/runc-mdst" \
        --allow "$SRC_ADDR" --cgroup-parent "/$cg_dst" </dev/null >/dev/null 2>"$dir/migrate-dst.log" &
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
        sizes="$sizes" workloads="$workloads" dirty_rate="$dirty_rate" \
        dirty_bytes_per_sec="$(size_bytes "$dirty_rate")" runs="$runs" cases="$cases" \
        modes="$modes" warmup_s="$warmup" beat_ms=10 settle_ms="$settle_ms" \
        migrate_has_mode_flag="$has_mode_flag"
}

# The case being run, for messages and records.
c_size='' c_workload='' c_run='' c_label='' c_id='' c_base='' c_status=''

# Starts container $c_id on the source host: an overlay of the heap layer,
# migrate-heap filled and beating, its longest-gap measurement just reset.
start_source_container() {
    local seed=$c_run
    local -a heap=(/bin/migrate-heap --size "$c_size" --beat-ms 10 --seed "$seed")
    [ "$c_workload" = dirty ] && heap+=(--dirty "$dirty_rate")
    c_base=$dir/c/$c_id
    mkdir -p "$c_base"/{upper,work,rootfs}
    mount -t overlay overlay \
        -o "lowerdir=$dir/layer,upperdir=$c_base/upper,workdir=$c_base/work" "$c_base/rootfs"
    make_bundle "$c_base/bundle" "$c_base/rootfs" "/$cg_src/$c_id" "${heap[@]}"
    # stdout and stderr on a pipe (CRIU cannot dump a host file or a tty).
    on_host "$tag-src" runc --root "$dir/runc-src" run --detach --bundle "$c_base/bundle" "$c_id" \
        </dev/null > >(exec cat >>"$c_base/stdout.log") 2>&1
    children+=("$!")
    c_status=$c_base/rootfs/heap/status.json
    heap_wait_ready "$c_status" 300 || { show_log "$c_base/stdout.log"; die "$c_label: the heap did not start"; }
    sleep "$warmup"
    heap_reset_gap "$dir/runc-src" "$c_id" "$c_status"
}

# Removes everything of the case's container, wherever it ended up.
teardown_case() {
    local root
    for root in "$dir"/runc-*; do
        runc_remove "$root" "$c_id"
    done
    unmount_under "$dir/c/$c_id"
    rm -rf "$dir/c/$c_id"
    unmount_under "$dir/mdst-state/containers/$c_id"
    rm -rf "$dir/mdst-state/containers/$c_id"
}

# After the move: waits until the heap has beaten past END + settle_ms on
# the destination (status file STATUS), keeps that status as heap.json, then
# checks every page (runc root ROOT); verify.json holds the result.
check_destination() {
    local root=$1 status=$2 end=$3
    heap_wait_beat_after "$status" $((end + settle_ms)) 300 ||
        { show_log "$c_base/stdout.log"; die "$c_label: the heap does not run on the destination"; }
    cp "$status" "$c_base/heap.json"
    if ! heap_verify "$root" "$c_id" "$status" 600 >"$c_base/verify.json"; then
        die "$c_label ($c_size, $c_workload, run $c_run): MEMORY CHECK FAILED on the destination: $(cat "$c_base/verify.json")"
    fi
}

# 1 during the warm-up round, whose cases are not recorded.
warming=0

# Appends the record of a finished case: common fields, then KEY=VALUE...
record_case() {
    local app_gap gap_end
    if [ "$warming" -eq 1 ]; then
        say "warm-up $c_label: memory ok"
        return 0
    fi
    app_gap=$(heap_num "$c_base/heap.json" max_gap_ms)
    gap_end=$(heap_num "$c_base/heap.json" max_gap_end_ms)
    python3 "$report_py" record "$dir/runs.jsonl" \
        size="$c_size" size_bytes="$(size_bytes "$c_size")" workload="$c_workload" \
        run="$c_run" label="$c_label" status=ok \
        app_downtime_ms="$app_gap" app_gap_end_ms="$gap_end" \
        verify=@"$c_base/verify.json" heap=@"$c_base/heap.json" "$@"
    local downtime total
    downtime=$(python3 -c 'import json, sys; print(round(json.loads(sys.stdin.readlines()[-1])["downtime_ms"]))' <"$dir/runs.jsonl")
    total=$(python3 -c 'import json, sys; print(round(json.loads(sys.stdin.readlines()[-1])["total_ms"]))' <"$dir/runs.jsonl")
    say "$c_size $c_workload run $c_run/$runs $c_label: downtime $downtime ms, app gap ${app_gap%.*} ms, total $total ms, memory ok"
}

record_unavailable() {
    local mode=$1 reason=$2
    [ "$warming" -eq 0 ] || return 0
    python3 "$report_py" record "$dir/runs.jsonl" \
        size="$c_size" size_bytes="$(size_bytes "$c_size")" workload="$c_workload" \
        run="$c_run" label="$c_label" case=migrate mode="$mode" status=unavailable reason="$reason"
}

# 1. CRIU's floor: checkpoint to tmpfs and restore on one host.
run_floor() {
    c_label=criu-floor
    c_id=$tag-floor-$c_size-$c_workload-$c_run
    start_source_container
    local base=$c_base t0 t1 t2
    criu_timing_config "$base/criu"
    t0=$(now_ms)
    CRIU_CONFIG_FILE=$base/criu/criu.conf on_host "$tag-src" runc --root "$dir/runc-src" \
        checkpoint --image-path "$base/images" --work-path "$base/dump-work" "$c_id" ||
        { show_log "$base/dump-work/dump.log"; die "$c_label: runc checkpoint failed"; }
    t1=$(now_ms)
    CRIU_CONFIG_FILE=$base/criu/criu.conf on_host "$tag-src" runc --root "$dir/runc-floor" \
        restore --detach --image-path "$base/images" --work-path "$base/restore-work" \
        --bundle "$base/bundle" "$c_id" </dev/null > >(exec cat >>"$base/stdout.log") 2>&1 ||
        { show_log "$base/restore-work/restore.log"; die "$c_label: runc restore failed"; }
    children+=("$!")
    t2=$(now_ms)
    local frozen resumed
    frozen=$(criu_action_ms "$base/criu" pre-dump)
    resumed=$(criu_action_ms "$base/criu" post-resume)
    check_destination "$dir/runc-floor" "$c_status" "$t2"
    record_case case=criu-floor mode=null \
        downtime_ms=$((t2 - frozen)) total_ms=$((t2 - t0)) bytes_wire=0 \
        checkpoint_ms=$((t1 - t0)) restore_ms=$((t2 - t1)) \
        frozen_to_resumed_ms=$((resumed - frozen)) \
        images_bytes="$(du -sb "$base/images" | cut -f1)"
    teardown_case
}

# 2. CRIU's page-server pipeline between the hosts.
run_page_server() {
    c_label=criu-page-server
    c_id=$tag-ps-$c_size-$c_workload-$c_run
    start_source_container
    local base=$c_base d=$c_base/dst ps_pid i
    mkdir -p "$d"/{images,upper,work,rootfs,bundle}
    # The destination's bundle is known in advance: the source's, with the
    # destination's rootfs and cgroup.
    python3 - "$base/bundle/config.json" "$d/bundle/config.json" "$d/rootfs" "/$cg_dst/$c_id" <<'PY'
import json, sys
src, dst, rootfs, cgroup = sys.argv[1:]
c = json.load(open(src))
c["root"]["path"] = rootfs
c["linux"]["cgroupsPath"] = cgroup
json.dump(c, open(dst, "w"), indent=2)
PY
    criu_timing_config "$base/criu"
    nsenter --net="/run/netns/$tag-dst" criu page-server --images-dir "$d/images" --address "$DST_ADDR" \
        --port "$page_server_port" --log-file "$d/page-server.log" -v4 </dev/null >/dev/null 2>&1 &
    ps_pid=$!
    children+=("$ps_pid")
    for ((i = 0; i < 100; i++)); do
        nsenter --net="/run/netns/$tag-dst" ss -Hltn "sport = :$page_server_port" | grep -q . && break
        child_alive "$ps_pid" || { show_log "$d/page-server.log"; die "criu page-server exited"; }
        sleep 0.1
    done
    local w0 w1 t0 t1 t2 t3
    w0=$(veth_bytes)
    t0=$(now_ms)
    CRIU_CONFIG_FILE=$base/criu/criu.conf on_host "$tag-src" runc --root "$dir/runc-src" \
        checkpoint --page-server "$DST_ADDR:$page_server_port" \
        --image-path "$base/images" --work-path "$base/dump-work" "$c_id" ||
        { show_log "$base/dump-work/dump.log"; show_log "$d/page-server.log"; die "$c_label: runc checkpoint --page-server failed"; }
    t1=$(now_ms)
    # The page server exits once it has written the last page.
    for ((i = 0; i < 6000; i++)); do
        child_alive "$ps_pid" || break
        sleep 0.01
    done
    wait "$ps_pid" || { show_log "$d/page-server.log"; die "$c_label: criu page-server failed"; }
    # The other images and the rootfs changes "across" (the pages are there
    # already; -n keeps the page server's pagemap).
    cp -rn "$base/images/." "$d/images/"
    cp -a "$base/upper/." "$d/upper/"
    mount -t overlay overlay \
        -o "lowerdir=$dir/layer,upperdir=$d/upper,workdir=$d/work" "$d/rootfs"
    t2=$(now_ms)
    CRIU_CONFIG_FILE=$base/criu/criu.conf on_host "$tag-dst" runc --root "$dir/runc-ps" \
        restore --detach --image-path "$d/images" --work-path "$d/restore-work" \
        --bundle "$d/bundle" "$c_id" </dev/null > >(exec cat >>"$base/stdout.log") 2>&1 ||
        { show_log "$d/restore-work/restore.log"; die "$c_label: runc restore failed"; }
    children+=("$!")
    t3=$(now_ms)
    w1=$(veth_bytes)
    local frozen resumed copied upper
    frozen=$(criu_action_ms "$base/criu" pre-dump)
    resumed=$(criu_action_ms "$base/criu" post-resume)
    copied=$(du -sb "$base/images" | cut -f1)
    upper=$(du -sb "$base/upper" | cut -f1)
    c_status=$d/rootfs/heap/status.json
    check_destination "$dir/runc-ps" "$c_status" "$t3"
    record_case case=criu-page-server mode=null \
        downtime_ms=$((t3 - frozen)) total_ms=$((t3 - t0)) \
        bytes_wire=$((w1 - w0 + copied + upper)) veth_bytes=$((w1 - w0)) \
        checkpoint_ms=$((t1 - t0)) copy_ms=$((t2 - t1)) restore_ms=$((t3 - t2)) \
        frozen_to_resumed_ms=$((resumed - frozen)) \
        copied_images_bytes="$copied" upper_bytes="$upper"
    teardown_case
}

# Modes migrate refused, with its reason.
declare -A unavailable=()

# 3. migrate in mode $1.
run_migrate() {
    local mode=$1
    c_label="migrate $mode"
    c_id=$tag-m-$mode-$c_size-$c_workload-$c_run
    if [ -n "${unavailable[$mode]:-}" ]; then
        [ "$c_run" -eq 1 ] && record_unavailable "$mode" "${unavailable[$mode]}"
        return 0
    fi
    local -a mode_args=()
    # Today's migrate has no --mode; stop-and-copy is what it does then.
    if [ "$mode" != stop-and-copy ] || [ "$has_mode_flag" -eq 1 ]; then
        mode_args=(--mode "$mode")
    fi
    start_source_container
    local base=$c_base w0 w1 t0 t1 rc=0
    w0=$(veth_bytes)
    t0=$(now_ms)
    on_host "$tag-src" "$bin/migrate" "$c_id" --to "$DST_ADDR:$migrate_port" \
        --tls-dir "$dir/tls-src" --runc-root "$dir/runc-src" --work-dir "$dir/src-work" \
        --json "${mode_args[@]}" </dev/null >"$base/migrate.json" 2>"$base/migrate.err" || rc=$?
    t1=$(now_ms)
    w1=$(veth_bytes)
    if [ "$rc" -ne 0 ]; then
        local reason
        reason=$(sed -n 's/^migrate: error: //p' "$base/migrate.err" | head -n1)
        [ -n "$reason" ] || reason=$(grep -m1 -v '^\s*$' "$base/migrate.err" || echo "exit $rc")
        reason=${reason#error: }
        # A refusal leaves the container running on the source, never
        # frozen: no gap longer than a few beats.
        local gap=999999
        if runc --root "$dir/runc-src" state "$c_id" 2>/dev/null | grep -q '"status": *"running"' &&
            heap_wait_beat_after "$c_status" "$t1" 10 2>/dev/null; then
            gap=$(heap_num "$c_status" max_gap_ms)
        fi
        if [ "$mode" != stop-and-copy ] && { [ "$rc" -eq 2 ] || [ "${gap%.*}" -lt 250 ]; }; then
            say "$c_size $c_workload $c_label: unavailable: $reason"
            unavailable[$mode]=$reason
            record_unavailable "$mode" "$reason"
            teardown_case
            return 0
        fi
        show_log "$base/migrate.err"
        show_log "$dir/migrate-dst.log"
        die "$c_label ($c_size, $c_workload, run $c_run) failed: $reason"
    fi
    local reported
    reported=$(json_get "$base/migrate.json" mode)
    if [ "$reported" != null ] && [ "$reported" != "\"$mode\"" ]; then
        say "warning: asked for mode $mode, migrate reports $reported"
    fi
    c_status=$dir/mdst-state/containers/$c_id/rootfs/heap/status.json
    check_destination "$dir/runc-mdst" "$c_status" "$t1"
    record_case case=migrate mode="$mode" mode_flag="$([ "${#mode_args[@]}" -gt 0 ] && echo true || echo false)" \
        downtime_ms="$(json_get "$base/migrate.json" downtime_ms)" \
        total_ms="$(json_get "$base/migrate.json" total_ms)" \
        bytes_wire="$(json_get "$base/migrate.json" bytes_wire)" \
        wall_ms=$((t1 - t0)) veth_bytes=$((w1 - w0)) \
        migrate=@"$base/migrate.json"
    teardown_case
}

write_meta
say "destination daemon on $DST_ADDR:$migrate_port"
start_migrate_dst

run_cases() {
    local c m
    for c in "${case_list[@]}"; do
        case $c in
            floor) run_floor ;;
            page-server) run_page_server ;;
            migrate)
                for m in "${mode_list[@]}"; do
                    run_migrate "$m"
                done
                ;;
        esac
    done
}

# One unrecorded round on a small heap first: the first checkpoint, restore
# and migration of a run pay for cold caches (and migrate sends the layer).
say "warm-up round (16M, idle; not recorded)"
warming=1 c_size=16M c_workload=idle c_run=0
run_cases
warming=0

for c_size in "${size_list[@]}"; do
    for c_workload in "${workload_list[@]}"; do
        for ((c_run = 1; c_run <= runs; c_run++)); do
            run_cases
        done
    done
done

finish_report
