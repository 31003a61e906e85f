# shellcheck shell=sh
# Helpers for the guest side of the test bed (busybox sh), sourced by /init
# and by the scenarios. VM_ROLE, VM_ADDR, VM_PEER come from the kernel
# command line (see init).

say() { echo "[vm-$VM_ROLE $(uptime_s)] $*"; }

# Seconds since boot, two decimals.
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# Milliseconds since boot.
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# vm_report KEY JSON: one line on the report port (ttyS1), which the host
# turns into "KEY": JSON in its result file. JSON must be one line.
vm_report() { printf '%s %s\n' "$1" "$2" >/dev/ttyS1; }

# MiB per second for BYTES moved in MS milliseconds.
rate_mib_s() { awk -v b="$1" -v ms="$2" 'BEGIN { if (ms < 1) ms = 1; printf "%.1f\n", b / 1048576 / (ms / 1000) }'; }

# Size of a directory tree in bytes.
dir_bytes() { find "$1" -type f -exec stat -c %s {} + | awk '{ s += $1 } END { printf "%d\n", s }'; }

fail() { say "FAIL: $*"; exit 1; }

# peer_send PORT CMD...: runs CMD (it must be re-runnable: a retry runs it
# again) and sends its output to the peer's PORT, retrying while the peer
# does not listen yet, for up to TIMEOUT seconds (default 120). socat with
# 64 KiB buffers: busybox nc moves 1 KiB per system call, slow under TCG.
# It returns when the receiver has read everything and closed: socat is
# bidirectional here and waits (-t) for the receiver's end to close, rather
# than quitting with data still in its socket buffer (a VM that powers off
# then never delivers it).
peer_send() {
    port=$1
    shift
    deadline=$(($(cut -d. -f1 /proc/uptime) + ${TIMEOUT:-120}))
    until "$@" | socat -b 65536 -t 600 STDIO "TCP:$VM_PEER:$port" >/dev/null 2>/tmp/peer_send.err; do
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] ||
            { say "sending to $VM_PEER:$port: $(cat /tmp/peer_send.err)"; return 1; }
        sleep 0.2
    done
}

# peer_recv PORT: accepts one connection on PORT and writes what it carries
# to stdout; fails after TIMEOUT seconds (default 300).
peer_recv() {
    timeout "${TIMEOUT:-300}" socat -u -b 65536 "TCP-LISTEN:$1,reuseaddr" STDOUT
}

# peer_msg PORT TEXT: sends one line.
peer_msg() { peer_send "$1" echo "$2"; }

# The container every scenario runs: a busybox rootfs (the image's /vm/layer)
# as the lower layer of an overlay, and a bundle whose process runs
# /workload.sh under busybox sh. CTR_* name the paths.
CTR_ID=heap
CTR_DIR=/run/ctr/heap
CTR_ROOTFS=$CTR_DIR/rootfs
CTR_UPPER=$CTR_DIR/upper
CTR_BUNDLE=$CTR_DIR/bundle

# The workload: a random token and a counter held only in the shell's
# memory, written to /state five times a second; and migrate-heap with
# HEAP_MIB of memory whose content compresses like a real heap's, rewritten
# at DIRTY per second (vm.heap_mib=, vm.dirty=; default 128 MiB, 2M), able
# to check every page (SIGUSR1, result in /heap/status.json). If the token
# survives, the counter goes on and the heap checks out, the memory came
# along.
ctr_workload() {
    cat <<EOF
/bin/migrate-heap --size ${VM_HEAP_MIB:-128}M --dirty ${DIRTY:-${VM_DIRTY:-2M}} --status /heap/status.json >/dev/null 2>&1 &
token=\$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n')
n=0
while :; do
    n=\$((n + 1))
    echo "\$n \$token" >/state.new && mv /state.new /state
    sleep 0.2
done
EOF
}

# ctr_use ID: the container the ctr_* functions work on (default "heap").
ctr_use() {
    CTR_ID=$1
    CTR_DIR=/run/ctr/$1
    CTR_ROOTFS=$CTR_DIR/rootfs
    CTR_UPPER=$CTR_DIR/upper
    CTR_BUNDLE=$CTR_DIR/bundle
}

ctr_prepare() {
    mkdir -p "$CTR_UPPER" "$CTR_DIR/work" "$CTR_ROOTFS" "$CTR_BUNDLE"
    mount -t overlay overlay -o "lowerdir=/vm/layer,upperdir=$CTR_UPPER,workdir=$CTR_DIR/work" "$CTR_ROOTFS"
    sed "s|@ROOTFS@|$CTR_ROOTFS|; s|\"/vm/heap\"|\"/vm/$CTR_ID\"|" /vm/config.json.in >"$CTR_BUNDLE/config.json"
    ctr_workload >"$CTR_UPPER/workload.sh"
}

ctr_start() {
    # The container's stdio on /dev/null (CRIU cannot dump a file of the
    # host's mount namespace); runc's own errors go to its --log.
    runc --log /tmp/runc-run.log run --detach --bundle "$CTR_BUNDLE" "$CTR_ID" </dev/null >/dev/null 2>&1 ||
        fail "runc run: $(cat /tmp/runc-run.log)"
    # Wait until the heap is filled: the first /state lines come at once,
    # the heap takes a few seconds under TCG.
    i=0
    until [ -s "$CTR_UPPER/state" ]; do
        i=$((i + 1))
        [ $i -lt 100 ] || fail "the workload wrote no /state"
        sleep 0.1
    done
}

# ctr_wait_heap: waits until migrate-heap has filled its memory.
ctr_wait_heap() {
    i=0
    until grep -q '"ready_ms":[1-9]' "$CTR_UPPER/heap/status.json" 2>/dev/null; do
        i=$((i + 1))
        [ $i -lt 900 ] || fail "the workload's heap did not fill"
        sleep 0.2
    done
    say "container $CTR_ID runs, heap filled: $(jq -c '{pages, fill_ms, dirty_bytes_per_sec}' "$CTR_UPPER/heap/status.json")"
}

# heap_verify ROOTFS: makes the container's migrate-heap check every page
# and fails unless all are as they must be.
heap_verify() {
    status=$1/heap/status.json
    # shellcheck disable=SC2016 # (expanded inside the container)
    runc exec "$CTR_ID" sh -c 'kill -USR1 $(pidof migrate-heap)' || fail "cannot signal migrate-heap"
    i=0
    until [ "$(jq -r '.verify.n // 0' "$status" 2>/dev/null)" -ge 1 ]; do
        i=$((i + 1))
        [ $i -lt 1200 ] || fail "migrate-heap did not verify its memory"
        sleep 0.1
    done
    [ "$(jq -r .verify.ok "$status")" = true ] || fail "the heap is corrupt: $(jq -c .verify "$status")"
    say "heap intact: $(jq -c .verify "$status")"
}

# State "N TOKEN" as the container last wrote it, from a rootfs dir.
ctr_state() { cat "$1/state"; }

# dst_start PORT [MIGRATE-DST OPTIONS...]: starts migrate-dst on this VM's
# address, allowing the other VM (the source, 10.77.0.1) to push containers,
# and waits until it listens; its pid is in $dst, its log in
# /tmp/migrate-dst.log.
dst_start() {
    listen_port=$1
    shift
    mkdir -p /var/lib/migrate-dst
    migrate-dst --listen "$VM_ADDR:$listen_port" --tls-dir "/vm/tls/$VM_ADDR" \
        --state-dir /var/lib/migrate-dst --allow "$VM_PEER" "$@" </dev/null >/dev/null 2>/tmp/migrate-dst.log &
    dst=$!
    i=0
    until grep -q listening /tmp/migrate-dst.log; do
        kill -0 "$dst" 2>/dev/null || { cat /tmp/migrate-dst.log; fail "migrate-dst exited"; }
        i=$((i + 1))
        [ $i -lt 300 ] || { cat /tmp/migrate-dst.log; fail "migrate-dst does not listen"; }
        sleep 0.1
    done
    say "migrate-dst listens on $VM_ADDR:$listen_port"
}
