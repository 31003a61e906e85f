# shellcheck shell=sh
# Runs migration cases one after another between A and B, one container
# each, and checks each on both sides. Sourced by the scenarios that set
# CASES: comma-separated MODE:DIRTY:EXPECT, e.g.
# "pre-copy:256K:converges,pre-copy:24M:stalls" (vm.cases= overrides it).
#   MODE    migrate's --mode
#   DIRTY   the heap's rewrite rate (migrate-heap --dirty)
#   EXPECT  converges: two or more rounds, and the final dump carried at
#           most 5 % of the pages the first round did; stalls: the rule froze
#           because rounds stopped shrinking, with the final dump still
#           carrying more than that; any: not checked
# B runs migrate-dst with --cgroup-parent /migrated and checks that each
# restored container's cgroup is under it (runc ignores the parent on
# cgroup v2; the destination sets CRIU's cgroup root for it). A reports
# each case's migrate summary as "case_N".
# Usage (by a scenario): . /vm/cases.sh; run_cases a|b
set -eu
# shellcheck source=scripts/vm/lib.sh
. /vm/lib.sh
dst_port=7070
tls=/vm/tls/$VM_ADDR
CASES=${VM_CASES:-$CASES}

case_count() { echo "$CASES" | tr ',' '\n' | grep -c .; }
case_field() { echo "$CASES" | cut -d, -f"$1" | cut -d: -f"$2"; }

run_b() {
    dst_start "$dst_port" --cgroup-parent /migrated
    peer_msg 7200 ready
    n=1
    while [ "$n" -le "$(case_count)" ]; do
        ctr_use "case$n"
        before=$(TIMEOUT=900 peer_recv 7201) || { cat /tmp/migrate-dst.log; fail "no word from A on case $n"; }
        case "$before" in
            failed*) cat /tmp/migrate-dst.log; fail "case $n failed in A" ;;
        esac
        state=$(runc state "$CTR_ID" 2>&1 | jq -r .status 2>/dev/null || true)
        [ "$state" = running ] || { cat /tmp/migrate-dst.log; fail "case $n does not run in B ($state)"; }
        after=$(runc exec "$CTR_ID" cat /state)
        [ "${after#* }" = "${before#* }" ] || fail "case $n: the in-memory token changed: $before -> $after"
        [ "${after%% *}" -gt "${before%% *}" ] || fail "case $n: the counter did not go on: $before -> $after"
        heap_verify "/var/lib/migrate-dst/containers/$CTR_ID/rootfs"
        pid=$(runc state "$CTR_ID" | jq -r .pid)
        cgroup=$(cut -d: -f3 "/proc/$pid/cgroup")
        case "$cgroup" in
            /migrated/*) ;;
            *) fail "case $n: the restored container's cgroup is $cgroup, not under --cgroup-parent /migrated" ;;
        esac
        vm_report "case_${n}_b" "{\"at_freeze\": \"$before\", \"in_b\": \"$after\", \"cgroup\": \"$cgroup\"}"
        runc kill "$CTR_ID" KILL
        i=0
        while [ "$(runc state "$CTR_ID" 2>/dev/null | jq -r .status)" = running ]; do
            i=$((i + 1))
            [ $i -lt 100 ] || fail "case $n does not stop"
            sleep 0.1
        done
        runc delete --force "$CTR_ID"
        peer_msg 7202 "done $n"
        n=$((n + 1))
    done
    kill "$dst"
    wait "$dst" || true
}

run_a() {
    ready=$(TIMEOUT=120 peer_recv 7200) || fail "migrate-dst in B did not get ready"
    [ "$ready" = ready ] || fail "B said $ready"
    n=1
    while [ "$n" -le "$(case_count)" ]; do
        mode=$(case_field "$n" 1)
        DIRTY=$(case_field "$n" 2)
        expect=$(case_field "$n" 3)
        ctr_use "case$n"
        ctr_prepare
        ctr_start
        ctr_wait_heap
        pid=$(runc state "$CTR_ID" | jq -r .pid)
        sleep 2
        say "case $n: migrate --mode $mode, heap dirtied at $DIRTY/s"
        t0=$(now_ms)
        if ! migrate "$CTR_ID" --to "$VM_PEER:$dst_port" --tls-dir "$tls" --json --mode "$mode" \
            >/tmp/case$n.json 2>/tmp/case$n.err; then
            cat /tmp/case$n.err
            peer_msg 7201 failed || true
            fail "case $n: migrate failed"
        fi
        ms=$(($(now_ms) - t0))
        cat /tmp/case$n.err
        summary=$(jq -c . /tmp/case$n.json)
        say "case $n: ${ms} ms: $summary"
        vm_report "case_$n" "$summary"
        ! runc state "$CTR_ID" >/dev/null 2>&1 || fail "case $n: runc still knows the container in A"
        ! kill -0 "$pid" 2>/dev/null || fail "case $n: the container's process $pid still runs in A"
        used=$(jq -r .mode.used /tmp/case$n.json)
        [ "$used" = "$mode" ] || fail "case $n: asked for $mode, migrate used $used"
        decision=$(jq -r '[.rounds[] | select(.decision != null)] | last | .decision // "none"' /tmp/case$n.json)
        rounds=$(jq '[.rounds[] | select(.kind == "pre-dump")] | length' /tmp/case$n.json)
        # The final dump's pages as a share (per mille) of the first round's.
        share=$(jq '(.rounds | last | .pages_written) * 1000 / ([.rounds[0].pages_written, 1] | max) | floor' /tmp/case$n.json)
        say "case $n: $rounds pre-dump round(s), the rule's last decision: $decision, final dump ${share}‰ of the first round's pages"
        case "$expect" in
            converges)
                [ "$rounds" -ge 2 ] || fail "case $n: expected it to converge over rounds, got $rounds"
                [ "$share" -le 50 ] || fail "case $n: expected a small frozen step, the final dump carried ${share}‰ of the first round's pages"
                ;;
            stalls)
                [ "$decision" = not-shrinking ] || fail "case $n: expected rounds to stop shrinking, the rule said $decision"
                [ "$share" -gt 50 ] || fail "case $n: expected the workload to outrun the link, the final dump carried only ${share}‰"
                ;;
            any) ;;
            *) fail "case $n: unknown expectation $expect" ;;
        esac
        peer_msg 7201 "$(cat "$CTR_UPPER/state")"
        done_msg=$(TIMEOUT=300 peer_recv 7202) || fail "B did not finish case $n"
        say "B: $done_msg"
        n=$((n + 1))
    done
}

run_cases() {
    if [ "$1" = b ]; then run_b; else run_a; fi
}
