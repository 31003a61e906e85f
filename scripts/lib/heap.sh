# shellcheck shell=bash
# Talking to a migrate-heap container through its status file (read from
# the host through the container's rootfs) and runc signals. See
# heap/src/status.rs for the file's format. Sourced; needs python3.
#
#   now_ms                           CLOCK_REALTIME in ms (the heap's clock)
#   heap_num FILE KEY                a top-level number of the status
#   heap_wait_ready FILE SECS        until the heap is filled and beating
#   heap_wait_beat_after FILE MS SECS  until a beat later than MS is recorded
#   heap_reset_gap ROOT ID FILE      SIGUSR2: measure the longest gap from now
#   heap_verify ROOT ID FILE SECS    SIGUSR1, then prints the verify object;
#                                    fails unless every page is intact

now_ms() {
    local us=${EPOCHREALTIME//[!0-9]/}
    echo $((us / 1000))
}

# The first occurrence of "KEY":N is the top-level one: the nested verify
# object comes last in the file.
heap_num() {
    local file=$1 key=$2 v
    v=$(grep -o "\"$key\":[0-9.]*" "$file" 2>/dev/null | head -n1) || true
    v=${v#*:}
    [ -n "$v" ] || return 1
    echo "$v"
}

heap_wait_ready() {
    local file=$1 secs=$2 deadline
    deadline=$(($(now_ms) + secs * 1000))
    until [ "$(heap_num "$file" seq 2>/dev/null || echo 0)" -ge 1 ]; do
        if [ "$(now_ms)" -gt "$deadline" ]; then
            echo "migrate-heap did not become ready within ${secs}s ($file)" >&2
            return 1
        fi
        sleep 0.1
    done
}

heap_wait_beat_after() {
    local file=$1 after=$2 secs=$3 deadline now
    deadline=$(($(now_ms) + secs * 1000))
    while :; do
        now=$(heap_num "$file" now_ms 2>/dev/null || echo 0)
        [ "$now" -gt "$after" ] && return 0
        if [ "$(now_ms)" -gt "$deadline" ]; then
            echo "migrate-heap recorded no beat after $after within ${secs}s ($file)" >&2
            return 1
        fi
        sleep 0.05
    done
}

heap_reset_gap() {
    local root=$1 id=$2 file=$3 sent deadline
    sent=$(now_ms)
    runc --root "$root" kill "$id" USR2
    deadline=$((sent + 10000))
    until [ "$(heap_num "$file" gap_since_ms 2>/dev/null || echo 0)" -ge "$sent" ]; do
        if [ "$(now_ms)" -gt "$deadline" ]; then
            echo "migrate-heap in $id did not reset its gap after SIGUSR2" >&2
            return 1
        fi
        sleep 0.02
    done
}

# The verify object, once the run SIGUSR1 starts has finished.
heap_verify() {
    local root=$1 id=$2 file=$3 secs=$4 before n deadline
    before=$(grep -o '"n":[0-9]*' "$file" 2>/dev/null | head -n1) || true
    before=${before#*:}
    runc --root "$root" kill "$id" USR1
    deadline=$(($(now_ms) + secs * 1000))
    while :; do
        n=$(grep -o '"n":[0-9]*' "$file" 2>/dev/null | head -n1) || true
        n=${n#*:}
        [ -n "$n" ] && [ "$n" -gt "${before:-0}" ] && break
        if [ "$(now_ms)" -gt "$deadline" ]; then
            echo "migrate-heap in $id did not verify its memory within ${secs}s" >&2
            return 1
        fi
        sleep 0.1
    done
    python3 - "$file" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))["verify"]
print(json.dumps(v))
if not v["ok"] or v["bad_pages"] != 0:
    print(f"MEMORY CHECK FAILED: {v['bad_pages']} of {v['pages']} pages wrong "
          f"(first: page {v['first_bad_page']})", file=sys.stderr)
    sys.exit(1)
PY
}
