#!/usr/bin/env bash
# Two QEMU VMs (TCG) with a kernel that has soft-dirty memory tracking, joined
# by a QEMU socket netdev on loopback, to test what this host's kernel cannot
# run: iterative pre-copy (CRIU pre-dumps). Run as root on Debian 12:
#
#   scripts/vm-testbed.sh [--scenario NAME] [--cpu MODEL] [--mem MIB]
#                         [--smp N] [--rounds N] [--mode MODE] [--out DIR]
#                         [--timeout SECS] [--append 'vm.key=value ...']
#
# It installs what it needs (QEMU 10 from bookworm-backports, nothing else
# from there), fetches and caches Debian's cloud kernel (bookworm-backports,
# not installed on the host), builds migrate and migrate-dst, assembles an
# initramfs (cached: rebuilt only when its inputs change), makes TLS
# material, boots VM A (10.77.0.1) and VM B (10.77.0.2) and runs
# scripts/vm/scenario-NAME.sh in both. Results land in DIR (default
# target/vm-testbed): result.json (pass/fail, both VMs' reports, the
# migration's figures), console-a.log, console-b.log. Exits non-zero on any
# failure, after showing the consoles. See scripts/vm/README.md.
set -euo pipefail

invoked_from=$(pwd)
cd "$(dirname "$0")/.."
repo=$(pwd)

scenario=runc-chain
cpu=Westmere
mem=1536
smp=1
mode=
rounds=2
timeout=900
append=
out=$repo/target/vm-testbed
cache=${VM_TESTBED_CACHE:-/var/cache/migrate-vm}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --scenario) scenario=$2; shift 2 ;;
        --cpu) cpu=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --mode) mode=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --append) append=$2; shift 2 ;;
        -h | --help) usage ;;
        *) echo "vm-testbed: unknown argument $1" >&2; usage ;;
    esac
done

case "$out" in /*) ;; *) out=$invoked_from/$out ;; esac

log() { printf '[vm-testbed %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, mknod for the initramfs)"
[ -f "scripts/vm/scenario-$scenario.sh" ] || die "no scenario scripts/vm/scenario-$scenario.sh (have: $(cd scripts/vm && printf '%s ' scenario-*.sh | sed 's/scenario-//g; s/\.sh//g'))"

t_start=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# shellcheck source=scripts/lib/vm.sh
. scripts/lib/vm.sh

tmp=$(mktemp -d /tmp/vm-testbed.XXXXXX)
qemu_pids=()
# shellcheck disable=SC2317 # (run by the trap)
cleanup() {
    local pid
    for pid in "${qemu_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${qemu_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

vm_install_deps
kernel_dir=$(vm_fetch_kernel "$cache/kernel")
log "kernel: $kernel_dir"

log "building migrate, migrate-dst and migrate-heap (cargo build --release)"
cargo build --release --quiet -p migrate-src -p migrate-dst -p migrate-heap

base=$(vm_base_initramfs "$kernel_dir" "$cache/initramfs")
log "base initramfs: $base ($(du -h "$base" | cut -f1))"
vm_run_initramfs "$tmp/run" "$repo/target/release" >"$tmp/run.cpio"
cat "$base" "$tmp/run.cpio" >"$tmp/initrd"
t_prepared=$(elapsed "$t_start")
log "prepared in ${t_prepared} s"

mkdir -p "$out"
rm -f "$out"/console-?.log "$out"/report-?.log "$out"/qemu-?.log "$out/result.json"
port=$(vm_free_port)
common_append="console=ttyS0 quiet panic=-1 vm.scenario=$scenario vm.rounds=$rounds${mode:+ vm.mode=$mode} $append"
t_boot=$(date +%s.%N)
vm_boot a 10.77.0.1 10.77.0.2 "listen=127.0.0.1:$port" "$common_append"
vm_wait_listen "$port" "${qemu_pids[0]}"
vm_boot b 10.77.0.2 10.77.0.1 "connect=127.0.0.1:$port" "$common_append"
log "VMs started (cpu $cpu, $smp vCPU and ${mem} MiB each, net socket 127.0.0.1:$port): A pid ${qemu_pids[0]}, B pid ${qemu_pids[1]}"

status=0
vm_wait_all "$timeout" || status=$?
t_vms=$(elapsed "$t_boot")
t_total=$(elapsed "$t_start")

vm_result "$out" "$scenario" "$cpu" "$mem" "$t_prepared" "$t_vms" "$t_total" "$status" >"$out/result.json"
if [ "$status" -eq 0 ] && [ "$(jq -r .pass "$out/result.json")" = true ]; then
    vm_show_summary "$out"
    log "PASS: scenario $scenario in ${t_vms} s (total ${t_total} s); $out/result.json"
    exit 0
fi
for role in a b; do
    echo "===== console of VM ${role^^} ($out/console-$role.log) =====" >&2
    cat "$out/console-$role.log" >&2 || true
done
vm_show_summary "$out" || true
log "FAIL: scenario $scenario; $out/result.json"
exit 1
