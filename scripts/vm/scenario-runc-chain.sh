# shellcheck shell=sh
# Scenario "runc-chain": iterative pre-copy with plain runc and CRIU, no
# migrate. A runs the container and takes ROUNDS (vm.rounds=, default 2)
# pre-dumps, each on top of the previous (`--parent-path ../N-1`), then the
# final dump on top of the last; each image dir goes to B as soon as it is
# written (GNU tar over socat); the final one carries the container's upper
# dir too. B restores with `runc restore` and checks that the workload's
# in-memory token and counter went on. ROUNDS=0 is plain stop-and-copy.
#
# Frozen time = final dump + its transfer + restore (B sends its restore
# time back to A). Reports: rounds (array), frozen_ms; B: restore_ms, checks.
# Usage (by init): sh scenario-runc-chain.sh a|b
set -eu
# shellcheck source=scripts/vm/lib.sh
. /vm/lib.sh
role=$1
rounds=${VM_ROUNDS:-2}
final=$((rounds + 1))
images=/dev/shm/images

if [ "$role" = b ]; then
    mkdir -p "$images"
    # A receiver per round, all listening from the start: A never waits
    # for B to get ready for the next round (that would count as frozen
    # time in the last one).
    i=1
    while [ "$i" -le "$final" ]; do
        (
            # shellcheck disable=SC3040 # busybox ash has pipefail
            set -o pipefail
            TIMEOUT=600 peer_recv $((7100 + i)) | tar -C "$images" -xf -
            say "round $i received"
        ) &
        eval "receiver_$i=\$!"
        i=$((i + 1))
    done
    i=1
    while [ "$i" -le "$final" ]; do
        eval "wait \$receiver_$i" || fail "receiving round $i"
        i=$((i + 1))
    done
    # The container's rootfs as A left it: same lower layer, its upper dir.
    mkdir -p "$CTR_DIR"
    mv "$images/upper" "$CTR_UPPER"
    mkdir -p "$CTR_DIR/work" "$CTR_ROOTFS" "$CTR_BUNDLE"
    mount -t overlay overlay -o "lowerdir=/vm/layer,upperdir=$CTR_UPPER,workdir=$CTR_DIR/work" "$CTR_ROOTFS"
    sed "s|@ROOTFS@|$CTR_ROOTFS|" /vm/config.json.in >"$CTR_BUNDLE/config.json"
    t0=$(now_ms)
    runc restore --detach --image-path "$images/$final" --work-path /tmp/restore-work \
        --bundle "$CTR_BUNDLE" "$CTR_ID" </dev/null >/dev/null 2>/tmp/restore.err || {
        cat /tmp/restore.err
        grep -h Error /tmp/restore-work/restore.log 2>/dev/null | tail -n 20
        fail "runc restore"
    }
    restore_ms=$(($(now_ms) - t0))
    say "restored in $restore_ms ms"
    vm_report restore_ms "$restore_ms"
    peer_msg 7200 "$restore_ms"

    before=$(cat "$images/state")
    sleep 1.5
    [ "$(runc state "$CTR_ID" | sed -n 's/.*"status": "\([a-z]*\)".*/\1/p')" = running ] ||
        fail "the container does not run in B: $(runc state "$CTR_ID")"
    after=$(runc exec "$CTR_ID" cat /state)
    say "state at the final dump: $before; in B now: $after"
    [ "${after#* }" = "${before#* }" ] || fail "the in-memory token changed: $before -> $after (restarted, not restored)"
    [ "${after%% *}" -gt "${before%% *}" ] || fail "the counter did not go on: $before -> $after"
    vm_report state "{\"at_dump\": \"$before\", \"in_b\": \"$after\"}"
    runc kill "$CTR_ID" KILL
    exit 0
fi

ctr_prepare
ctr_start
ctr_wait_heap
pid=$(runc state "$CTR_ID" | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
sleep 2

json=
frozen_ms=0
i=1
while [ "$i" -le "$final" ]; do
    if [ "$i" -lt "$final" ]; then kind=pre-dump; else kind=dump; fi
    set -- --image-path "$images/$i"
    [ "$kind" = dump ] || set -- "$@" --pre-dump
    [ "$i" -eq 1 ] || set -- "$@" --parent-path "../$((i - 1))"
    mkdir -p "$images/$i"
    t0=$(now_ms)
    runc checkpoint "$@" "$CTR_ID" 2>/tmp/checkpoint.err || {
        cat /tmp/checkpoint.err
        grep -h Error "$images/$i"/*.log 2>/dev/null | tail -n 20
        fail "runc checkpoint ($kind, round $i)"
    }
    ms=$(($(now_ms) - t0))
    pages=$(find "$images/$i" -name 'pages-*.img' -exec stat -c %s {} + | awk '{ s += $1 } END { printf "%d", s }')
    bytes=$(dir_bytes "$images/$i")
    if [ "$kind" = dump ]; then
        # The container is stopped: its rootfs changes and last state go too.
        cp -a "$CTR_UPPER" "$images/upper"
        cp "$CTR_UPPER/state" "$images/state"
        set -- "$i" upper state
    else
        set -- "$i"
    fi
    t1=$(now_ms)
    peer_send $((7100 + i)) tar -C "$images" -cf - "$@" || fail "sending round $i"
    send_ms=$(($(now_ms) - t1))
    say "round $i ($kind): CRIU $ms ms, $bytes bytes ($pages of pages), sent in $send_ms ms ($(rate_mib_s "$bytes" "$send_ms") MiB/s)"
    json="$json${json:+, }{\"round\": $i, \"kind\": \"$kind\", \"ms\": $ms, \"bytes\": $bytes, \"page_bytes\": $pages, \"send_ms\": $send_ms}"
    [ "$kind" = pre-dump ] || frozen_ms=$((ms + send_ms))
    i=$((i + 1))
done
vm_report rounds "[$json]"
restore_ms=$(TIMEOUT=120 peer_recv 7200) || fail "no word from B about the restore"
frozen_ms=$((frozen_ms + restore_ms))
say "frozen: $frozen_ms ms (final dump + transfer + restore in B: $restore_ms ms)"
vm_report frozen_ms "$frozen_ms"

# Gone from A: runc checkpoint killed it and removed its record.
! runc state "$CTR_ID" >/dev/null 2>&1 || fail "after the final dump runc still knows the container in A: $(runc state "$CTR_ID")"
! kill -0 "$pid" 2>/dev/null || fail "the container's process $pid still runs in A"
