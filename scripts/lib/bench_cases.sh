# shellcheck shell=bash
# The cases of scripts/bench.sh, one function each, and what they share:
# the source container, the checks on the destination, the records. Sourced
# by bench.sh after its settings (dir, tag, bin, cg_src, cg_dst, ports, the
# case variables c_*) are set; see bench.sh --help for what each case does.
#
#   run_floor, run_tcp_copy, run_page_server, run_manual
#   run_migrate MODE [VARIANT ARGS]
#
# bench.sh sets the globals these functions read:
# shellcheck disable=SC2154

# The case being run, for messages and records.
c_link='' c_size='' c_workload='' c_run='' c_label='' c_id='' c_base='' c_status=''
# CPU seconds of each side since cpu_mark, set by cpu_read, and the
# window's ends (epoch ms).
c_cpu_src0=0 c_cpu_dst0=0 c_cpu_src_s=null c_cpu_dst_s=null c_cpu_from_ms=null c_cpu_to_ms=null

# 1 during the warm-up round, whose cases are not recorded.
warming=0

# Modes and variants migrate refused (by label), with its reason.
declare -A unavailable=()

cpu_mark() {
    c_cpu_from_ms=$(now_ms)
    c_cpu_src0=$(cpuacct_usage_ns "$cg_src")
    c_cpu_dst0=$(cpuacct_usage_ns "$cg_dst")
}

ns_to_s() {
    local ns=$1
    printf '%d.%03d' $((ns / 1000000000)) $((ns / 1000000 % 1000))
}

cpu_read() {
    c_cpu_to_ms=$(now_ms)
    c_cpu_src_s=$(ns_to_s $(($(cpuacct_usage_ns "$cg_src") - c_cpu_src0)))
    c_cpu_dst_s=$(ns_to_s $(($(cpuacct_usage_ns "$cg_dst") - c_cpu_dst0)))
}

# Runs a command (or a function) in a subshell that joined cpuacct GROUP.
cpuacct_run() (
    cpuacct_join "$1"
    shift
    "$@"
)

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

# The bundle of the container's restored copy: the source's, with ROOTFS
# and the destination side's cgroup (where its CPU time counts).
destination_bundle() {
    local bundle=$1 rootfs=$2
    mkdir -p "$bundle"
    python3 - "$c_base/bundle/config.json" "$bundle/config.json" "$rootfs" "/$cg_dst/$c_id" <<'PY'
import json, sys
src, dst, rootfs, cgroup = sys.argv[1:]
c = json.load(open(src))
c["root"]["path"] = rootfs
c["linux"]["cgroupsPath"] = cgroup
json.dump(c, open(dst, "w"), indent=2)
PY
}

# Waits until PID, a listener on the destination host, accepts on PORT.
wait_listening() {
    local port=$1 pid=$2 what=$3 i
    for ((i = 0; i < 100; i++)); do
        on_host "$tag-dst" ss -Hltn "sport = :$port" | grep -q . && return 0
        child_alive "$pid" || die "$c_label: $what exited before it listened"
        sleep 0.1
    done
    die "$c_label: $what does not listen on $DST_ADDR:$port"
}

# runc checkpoint of $c_id into $c_base/images, CRIU timing its steps
# ($c_base/criu), counted on the source side; extra runc options in "$@".
checkpoint_source() {
    criu_timing_config "$c_base/criu"
    CRIU_CONFIG_FILE=$c_base/criu/criu.conf cpuacct_run "$cg_src/tools" on_host "$tag-src" \
        runc --root "$dir/runc-src" checkpoint "$@" \
        --image-path "$c_base/images" --work-path "$c_base/dump-work" "$c_id" ||
        { show_log "$c_base/dump-work/dump.log"; die "$c_label: runc checkpoint failed"; }
}

# runc restore of $c_id on host HOST under runc root ROOT from IMAGES with
# BUNDLE, counted on the destination side.
restore_destination() {
    local host=$1 root=$2 images=$3 bundle=$4 work
    work=$(dirname "$images")/restore-work
    CRIU_CONFIG_FILE=$c_base/criu/criu.conf cpuacct_run "$cg_dst/tools" on_host "$host" \
        runc --root "$root" restore --detach --image-path "$images" --work-path "$work" \
        --bundle "$bundle" "$c_id" </dev/null > >(exec cat >>"$c_base/stdout.log") 2>&1 ||
        { show_log "$work/restore.log"; die "$c_label: runc restore failed"; }
    children+=("$!")
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
    # One open of a file the heap replaces (by rename) every beat: cp
    # gives up when the name moves to another file while it copies.
    cat "$status" >"$c_base/heap.json"
    if ! heap_verify "$root" "$c_id" "$status" 600 >"$c_base/verify.json"; then
        die "$c_label ($c_size, $c_workload, run $c_run): MEMORY CHECK FAILED on the destination: $(cat "$c_base/verify.json")"
    fi
}

record_fields() {
    python3 "$report_py" record "$dir/runs.jsonl" \
        link="$c_link" size="$c_size" size_bytes="$(size_bytes "$c_size")" workload="$c_workload" \
        run="$c_run" label="$c_label" "$@"
}

last_record() {
    python3 -c 'import json, sys; v = json.loads(sys.stdin.readlines()[-1]).get(sys.argv[1]); print("-" if v is None else round(v, 3))' "$1" <"$dir/runs.jsonl"
}

# Appends the record of a finished case that moved the heap: common fields,
# the CPU seconds of each side, then KEY=VALUE...
record_case() {
    local app_gap gap_end
    if [ "$warming" -eq 1 ]; then
        say "warm-up $c_label: memory ok"
        return 0
    fi
    app_gap=$(heap_num "$c_base/heap.json" max_gap_ms)
    gap_end=$(heap_num "$c_base/heap.json" max_gap_end_ms)
    record_fields status=ok app_downtime_ms="$app_gap" app_gap_end_ms="$gap_end" \
        cpu_src_s="$c_cpu_src_s" cpu_dst_s="$c_cpu_dst_s" \
        cpu_from_ms="$c_cpu_from_ms" cpu_to_ms="$c_cpu_to_ms" \
        verify=@"$c_base/verify.json" heap=@"$c_base/heap.json" "$@"
    say "$c_link $c_size $c_workload run $c_run/$runs $c_label: downtime $(last_record downtime_ms) ms," \
        "app gap ${app_gap%.*} ms, total $(last_record total_ms) ms," \
        "cpu $c_cpu_src_s s + $c_cpu_dst_s s, memory ok"
}

record_unavailable() {
    local mode=$1 reason=$2
    [ "$warming" -eq 0 ] || return 0
    record_fields case=migrate mode="$mode" status=unavailable reason="$reason"
}

# 1. CRIU's floor: checkpoint to tmpfs and restore on one host (into the
# destination side's cgroup).
run_floor() {
    c_label=criu-floor
    c_id=$tag-floor-$c_size-$c_workload-$c_run
    start_source_container
    local base=$c_base t0 t1 t2
    destination_bundle "$base/restore-bundle" "$base/rootfs"
    cpu_mark
    t0=$(now_ms)
    checkpoint_source
    t1=$(now_ms)
    restore_destination "$tag-src" "$dir/runc-floor" "$base/images" "$base/restore-bundle"
    t2=$(now_ms)
    cpu_read
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

# 2. The link's ceiling: the bytes of a checkpoint's images, as one file,
# over one plain TCP connection (socat, 1 MiB buffers) into a file on the
# destination's tmpfs. Not a migration: nothing is restored.
run_tcp_copy() {
    c_label=tcp-copy
    c_id=$tag-tcp-$c_size-$c_workload-$c_run
    start_source_container
    local base=$c_base d=$c_base/dst recv_pid t0 t1 bytes received
    checkpoint_source
    mkdir -p "$d"
    cat "$base"/images/* >"$base/images.bin"
    rm -rf "$base/images"
    bytes=$(stat -c %s "$base/images.bin")
    (
        cpuacct_join "$cg_dst/tools"
        exec nsenter --net="/run/netns/$tag-dst" socat -u -b 1048576 \
            "TCP-LISTEN:$tcp_copy_port,bind=$DST_ADDR,reuseaddr" "CREATE:$d/images.bin"
    ) </dev/null 2>"$d/socat.log" &
    recv_pid=$!
    children+=("$recv_pid")
    wait_listening "$tcp_copy_port" "$recv_pid" "the receiving socat"
    cpu_mark
    t0=$(now_ms)
    cpuacct_run "$cg_src/tools" on_host "$tag-src" socat -u -b 1048576 \
        "OPEN:$base/images.bin,rdonly" "TCP:$DST_ADDR:$tcp_copy_port" ||
        { show_log "$d/socat.log"; die "$c_label: the sending socat failed"; }
    wait "$recv_pid" || { show_log "$d/socat.log"; die "$c_label: the receiving socat failed"; }
    t1=$(now_ms)
    cpu_read
    received=$(stat -c %s "$d/images.bin")
    [ "$received" -eq "$bytes" ] || die "$c_label: sent $bytes bytes, $received arrived"
    if [ "$warming" -eq 1 ]; then
        say "warm-up $c_label: $bytes bytes across"
    else
        record_fields case=tcp-copy mode=null status=ok downtime_ms=null total_ms=$((t1 - t0)) \
            transfer_ms=$((t1 - t0)) raw_bytes="$bytes" bytes_wire="$bytes" \
            cpu_src_s="$c_cpu_src_s" cpu_dst_s="$c_cpu_dst_s"
        say "$c_link $c_size $c_workload run $c_run/$runs $c_label: $bytes bytes in $((t1 - t0)) ms"
    fi
    teardown_case
}

# 3. CRIU's page-server pipeline between the hosts.
run_page_server() {
    c_label=criu-page-server
    c_id=$tag-ps-$c_size-$c_workload-$c_run
    start_source_container
    local base=$c_base d=$c_base/dst ps_pid i
    mkdir -p "$d"/{images,upper,work,rootfs}
    destination_bundle "$d/bundle" "$d/rootfs"
    (
        cpuacct_join "$cg_dst/tools"
        exec nsenter --net="/run/netns/$tag-dst" criu page-server --images-dir "$d/images" \
            --address "$DST_ADDR" --port "$page_server_port" --log-file "$d/page-server.log" -v4
    ) </dev/null >/dev/null 2>&1 &
    ps_pid=$!
    children+=("$ps_pid")
    wait_listening "$page_server_port" "$ps_pid" "criu page-server"
    local w0 w1 t0 t1 t2 t3
    w0=$(veth_bytes)
    cpu_mark
    t0=$(now_ms)
    checkpoint_source --page-server "$DST_ADDR:$page_server_port"
    t1=$(now_ms)
    # The page server exits once it has written the last page.
    for ((i = 0; i < 6000; i++)); do
        child_alive "$ps_pid" || break
        sleep 0.01
    done
    wait "$ps_pid" || { show_log "$d/page-server.log"; die "$c_label: criu page-server failed"; }
    # The other images and the rootfs changes "across" (the pages are there
    # already; -n keeps the page server's pagemap), by a local copy counted
    # on the destination side.
    cpuacct_run "$cg_dst/tools" cp -rn "$base/images/." "$d/images/"
    cpuacct_run "$cg_dst/tools" cp -a "$base/upper/." "$d/upper/"
    mount -t overlay overlay \
        -o "lowerdir=$dir/layer,upperdir=$d/upper,workdir=$d/work" "$d/rootfs"
    t2=$(now_ms)
    restore_destination "$tag-dst" "$dir/runc-ps" "$d/images" "$d/bundle"
    t3=$(now_ms)
    cpu_read
    w1=$(veth_bytes)
    local frozen resumed images upper
    frozen=$(criu_action_ms "$base/criu" pre-dump)
    resumed=$(criu_action_ms "$base/criu" post-resume)
    images=$(du -sb "$d/images" | cut -f1)
    upper=$(du -sb "$base/upper" | cut -f1)
    c_status=$d/rootfs/heap/status.json
    check_destination "$dir/runc-ps" "$c_status" "$t3"
    record_case case=criu-page-server mode=null \
        downtime_ms=$((t3 - frozen)) total_ms=$((t3 - t0)) \
        bytes_wire=$((w1 - w0 + $(du -sb "$base/images" | cut -f1) + upper)) veth_bytes=$((w1 - w0)) \
        raw_bytes=$((images + upper)) transfer_ms=$((t2 - t0)) \
        checkpoint_ms=$((t1 - t0)) copy_ms=$((t2 - t1)) restore_ms=$((t3 - t2)) \
        frozen_to_resumed_ms=$((resumed - frozen)) images_bytes="$images" upper_bytes="$upper"
    teardown_case
}

# 4. What an operator would script: runc checkpoint to tmpfs, the images
# and the upper dir as one tar stream through zstd -1 and socat, runc
# restore on the destination.
run_manual() {
    c_label=manual
    c_id=$tag-man-$c_size-$c_workload-$c_run
    start_source_container
    local base=$c_base d=$c_base/dst recv_pid t0 t1 t2 t3
    mkdir -p "$d"/{work,rootfs}
    destination_bundle "$d/bundle" "$d/rootfs"
    # The receiving pipeline is a process group of its own (setsid), so
    # that the cleanup ends every stage of it, not only the first.
    (
        cpuacct_join "$cg_dst/tools"
        # shellcheck disable=SC2016 # expanded by the inner bash
        exec setsid bash -c 'set -o pipefail
            nsenter --net="$1" socat -u "TCP-LISTEN:$2,bind=$3,reuseaddr" STDOUT |
                dd bs=1M 2>"$4" | zstd -d -q | tar -x --xattrs --xattrs-include="*" -C "$5"' \
            manual-receiver "/run/netns/$tag-dst" "$manual_port" "$DST_ADDR" "$d/dd.log" "$d"
    ) </dev/null 2>"$d/receiver.log" &
    recv_pid=$!
    groups+=("$recv_pid")
    wait_listening "$manual_port" "$recv_pid" "the receiving pipeline"
    cpu_mark
    t0=$(now_ms)
    checkpoint_source
    t1=$(now_ms)
    # shellcheck disable=SC2016 # expanded by the inner bash
    cpuacct_run "$cg_src/tools" bash -c 'set -o pipefail
        tar -C "$1" -c --xattrs --xattrs-include="*" images upper | zstd -1 -q |
            nsenter --net="$2" socat -u STDIN "TCP:$3"' \
        manual-sender "$base" "/run/netns/$tag-src" "$DST_ADDR:$manual_port" ||
        die "$c_label: the sending pipeline failed"
    wait "$recv_pid" || { show_log "$d/receiver.log"; die "$c_label: the receiving pipeline failed"; }
    mount -t overlay overlay \
        -o "lowerdir=$dir/layer,upperdir=$d/upper,workdir=$d/work" "$d/rootfs"
    t2=$(now_ms)
    restore_destination "$tag-dst" "$dir/runc-man" "$d/images" "$d/bundle"
    t3=$(now_ms)
    cpu_read
    local frozen resumed images upper wire
    frozen=$(criu_action_ms "$base/criu" pre-dump)
    resumed=$(criu_action_ms "$base/criu" post-resume)
    images=$(du -sb "$base/images" | cut -f1)
    upper=$(du -sb "$base/upper" | cut -f1)
    # dd's summary: "N bytes (...) copied, ...".
    wire=$(sed -n 's/^\([0-9]*\) bytes .*copied.*/\1/p' "$d/dd.log")
    [ -n "$wire" ] || { show_log "$d/dd.log"; die "$c_label: no byte count from dd"; }
    c_status=$d/rootfs/heap/status.json
    check_destination "$dir/runc-man" "$c_status" "$t3"
    record_case case=manual mode=null \
        downtime_ms=$((t3 - frozen)) total_ms=$((t3 - t0)) bytes_wire="$wire" \
        raw_bytes=$((images + upper)) transfer_ms=$((t2 - t1)) \
        checkpoint_ms=$((t1 - t0)) restore_ms=$((t3 - t2)) \
        frozen_to_resumed_ms=$((resumed - frozen)) images_bytes="$images" upper_bytes="$upper"
    teardown_case
}

# 5. migrate in mode MODE, with the extra arguments ARGS of variant VARIANT
# (none: migrate as it comes).
run_migrate() {
    local mode=$1 variant=${2:-} args=${3:-}
    c_label="migrate $mode${variant:+ $variant}"
    c_id=$tag-m-$mode${variant:+-$variant}-$c_size-$c_workload-$c_run
    if [ -n "${unavailable[$c_label]:-}" ]; then
        [ "$c_run" -eq 1 ] && record_unavailable "$mode" "${unavailable[$c_label]}"
        return 0
    fi
    local -a mode_args=() variant_args=()
    # Today's migrate has no --mode; stop-and-copy is what it does then.
    if [ "$mode" != stop-and-copy ] || [ "$has_mode_flag" -eq 1 ]; then
        mode_args=(--mode "$mode")
    fi
    read -ra variant_args <<<"$args"
    start_source_container
    local base=$c_base w0 w1 t0 t1 rc=0
    w0=$(veth_bytes)
    cpu_mark
    t0=$(now_ms)
    cpuacct_run "$cg_src/tools" on_host "$tag-src" "$bin/migrate" "$c_id" --to "$DST_ADDR:$migrate_port" \
        --tls-dir "$dir/tls-src" --runc-root "$dir/runc-src" --work-dir "$dir/src-work" \
        --json "${mode_args[@]}" "${variant_args[@]}" </dev/null >"$base/migrate.json" 2>"$base/migrate.err" || rc=$?
    t1=$(now_ms)
    cpu_read
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
        # Plain stop-and-copy must work; another mode or a variant's
        # arguments may be refused (exit 2: arguments migrate does not know).
        if { [ "$mode" != stop-and-copy ] || [ -n "$variant" ]; } &&
            { [ "$rc" -eq 2 ] || [ "${gap%.*}" -lt 250 ]; }; then
            say "$c_link $c_size $c_workload $c_label: unavailable: $reason"
            unavailable[$c_label]=$reason
            record_unavailable "$mode" "$reason"
            teardown_case
            return 0
        fi
        show_log "$base/migrate.err"
        show_log "$dir/migrate-dst.log"
        die "$c_label ($c_size, $c_workload, run $c_run) failed: $reason"
    fi
    # mode: {"requested", "used", "reason"}; a mode of an older migrate
    # was a plain string.
    local used
    used=$(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])).get("mode"); print((m.get("used") if isinstance(m, dict) else m) or "")' "$base/migrate.json")
    if [ -n "$used" ] && [ "$used" != "$mode" ]; then
        say "warning: asked for mode $mode, migrate used $used: $(json_get "$base/migrate.json" mode)"
    fi
    c_status=$dir/mdst-state/containers/$c_id/rootfs/heap/status.json
    check_destination "$dir/runc-mdst" "$c_status" "$t1"
    # raw_bytes: everything migrate moved uncompressed (post-copy: and the
    # pages after the restore); transfer_bytes over transfer_ms: what its
    # rounds sent in the time they spent sending it (the final dump's
    # included when its pages went while CRIU wrote them), and post-copy's pages
    # in the time they took to arrive after the restore.
    local transfer
    local -a transfer_fields
    transfer=$(python3 -c 'import json, sys
m = json.load(open(sys.argv[1]))
r = m.get("rounds") or []
pages = m.get("bytes_pages") or 0
# A round whose pages went while CRIU dumped sent them in its dump time too
# (as the page-server case counts its checkpoint).
t = sum((x.get("transfer_s") or 0) + ((x.get("dump_s") or 0) if x.get("bytes_raw_during_dump") else 0) for x in r) * 1000 + (m.get("pages_after_restore_ms") or 0)
b = sum(x.get("bytes_raw") or 0 for x in r) + pages
raw = (m.get("bytes_raw") or 0) + pages
print(f"raw_bytes={raw}", end=" ")
print(f"transfer_ms={round(t, 1)} transfer_bytes={b}" if t > 0 else "transfer_ms=null transfer_bytes=null")' "$base/migrate.json")
    read -ra transfer_fields <<<"$transfer"
    record_case case=migrate mode="$mode" mode_used="${used:-null}" variant="${variant:-null}" \
        variant_args="$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${variant_args[@]}")" \
        mode_flag="$([ "${#mode_args[@]}" -gt 0 ] && echo true || echo false)" \
        downtime_ms="$(json_get "$base/migrate.json" downtime_ms)" \
        total_ms="$(json_get "$base/migrate.json" total_ms)" \
        bytes_wire="$(json_get "$base/migrate.json" bytes_wire)" \
        "${transfer_fields[@]}" \
        wall_ms=$((t1 - t0)) veth_bytes=$((w1 - w0)) \
        migrate=@"$base/migrate.json"
    teardown_case
}
