# shellcheck shell=sh
# Scenario "migrate": `migrate` moves the container from A to B, where
# migrate-dst receives and restores it. vm.mode=MODE adds `--mode MODE`
# (for pre-copy, once migrate has it); without it migrate does its default,
# stop-and-copy. A reports migrate's --json summary as "migration" and
# checks the container is gone; B checks it runs there, its in-memory token
# and counter gone on from A's last state.
# Usage (by init): sh scenario-migrate.sh a|b
set -eu
# shellcheck source=scripts/vm/lib.sh
. /vm/lib.sh
role=$1
port=7070
tls=/vm/tls/$VM_ADDR

if [ "$role" = b ]; then
    dst_start "$port"
    peer_msg 7200 ready
    before=$(TIMEOUT=600 peer_recv 7201) || { cat /tmp/migrate-dst.log; fail "no word from A"; }
    say "A says: $before"
    case "$before" in
        failed*) cat /tmp/migrate-dst.log; fail "the migration failed in A" ;;
    esac
    sleep 1
    state=$(runc state "$CTR_ID" 2>&1 | sed -n 's/.*"status": "\([a-z]*\)".*/\1/p')
    [ "$state" = running ] || { cat /tmp/migrate-dst.log; fail "the container does not run in B ($state): $(runc list)"; }
    after=$(runc exec "$CTR_ID" cat /state)
    say "state when A froze it: $before; in B now: $after"
    [ "${after#* }" = "${before#* }" ] || fail "the in-memory token changed: $before -> $after (restarted, not restored)"
    [ "${after%% *}" -gt "${before%% *}" ] || fail "the counter did not go on: $before -> $after"
    vm_report state "{\"at_freeze\": \"$before\", \"in_b\": \"$after\"}"
    kill "$dst"
    wait "$dst" || true
    runc kill "$CTR_ID" KILL
    exit 0
fi

ctr_prepare
ctr_start
ctr_wait_heap
pid=$(runc state "$CTR_ID" | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
ready=$(TIMEOUT=120 peer_recv 7200) || fail "migrate-dst in B did not get ready"
[ "$ready" = ready ] || fail "B said $ready"
sleep 2

set -- "$CTR_ID" --to "$VM_PEER:$port" --tls-dir "$tls" --json
[ -z "${VM_MODE:-}" ] || set -- "$@" --mode "$VM_MODE"
say "migrate $*"
t0=$(now_ms)
if ! migrate "$@" >/tmp/migration.json 2>/tmp/migrate.err; then
    cat /tmp/migrate.err
    peer_msg 7201 failed || true
    fail "migrate failed"
fi
ms=$(($(now_ms) - t0))
[ -s /tmp/migration.json ] || { cat /tmp/migrate.err; fail "migrate printed no summary"; }
say "migrate: $(cat /tmp/migration.json) (${ms} ms)"
vm_report migration "$(cat /tmp/migration.json)"
vm_report migrate_ms "$ms"

# Gone from A: no runc record, no process.
! runc state "$CTR_ID" >/dev/null 2>&1 || fail "runc still knows the container in A: $(runc state "$CTR_ID")"
! kill -0 "$pid" 2>/dev/null || fail "the container's process $pid still runs in A"
# Its last state before the freeze, from the rootfs it left behind.
peer_msg 7201 "$(cat "$CTR_UPPER/state")"
