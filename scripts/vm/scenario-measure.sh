# shellcheck shell=sh
# Scenario "measure": what a CPU model costs, without a container. Both VMs
# report their boot time (init does); A measures a pipe inside the guest,
# /dev/urandom, sha256sum and the VM network (A -> B, with busybox nc and
# with socat), MIB (vm.mib=, default 32) MiB each.
# Usage (by init): sh scenario-measure.sh a|b
set -eu
# shellcheck source=scripts/vm/lib.sh
. /vm/lib.sh
role=$1
mib=${VM_MIB:-32}
bytes=$((mib * 1048576))

if [ "$role" = b ]; then
    [ -p /tmp/fifo ] || mkfifo /tmp/fifo
    timeout 120 nc -l -p 7301 <>/tmp/fifo | wc -c >/tmp/got
    [ "$(cat /tmp/got)" -eq "$bytes" ] || fail "nc: received $(cat /tmp/got) bytes, not $bytes"
    peer_recv 7302 | wc -c >/tmp/got
    [ "$(cat /tmp/got)" -eq "$bytes" ] || fail "socat: received $(cat /tmp/got) bytes, not $bytes"
    exit 0
fi

measure() { # KEY CMD...: reports KEY as MiB/s for $bytes through CMD
    key=$1
    shift
    t0=$(now_ms)
    "$@"
    ms=$(($(now_ms) - t0))
    vm_report "$key" "$(rate_mib_s "$bytes" "$ms")"
    say "$key: $mib MiB in $ms ms ($(rate_mib_s "$bytes" "$ms") MiB/s)"
}
pipe() { dd if=/dev/zero bs=64k count=$((mib * 16)) 2>/dev/null | cat >/dev/null; }
random() { head -c "$bytes" /dev/urandom >/tmp/random; }
sha256() { sha256sum /tmp/random >/dev/null; }
net_nc() { until nc "$VM_PEER" 7301 </tmp/random >/dev/null 2>&1; do sleep 0.2; done; }
net_socat() { peer_send 7302 cat /tmp/random; }
measure pipe_mib_s pipe
measure urandom_mib_s random
measure sha256_mib_s sha256
measure net_nc_mib_s net_nc
measure net_socat_mib_s net_socat
