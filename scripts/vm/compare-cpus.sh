#!/usr/bin/env bash
# Compares QEMU CPU models for the test bed: for each model, BOOTS runs of
# the "measure" scenario (boot time, guest pipe, /dev/urandom, sha256,
# VM-to-VM network with nc and socat) and MIGRATIONS runs of the "migrate"
# scenario (migrate's downtime and transfer rate). Prints one line per run
# and leaves each run's result.json under target/vm-testbed/compare/.
#
#   scripts/vm/compare-cpus.sh [BOOTS [MIGRATIONS [MODEL...]]]
#
# Defaults: 2 boots, 1 migration, Nehalem Westmere SandyBridge Haswell-noTSX.
set -euo pipefail
cd "$(dirname "$0")/../.."
boots=${1:-2}
migrations=${2:-1}
shift 2 2>/dev/null || shift $#
models=("$@")
[ "${#models[@]}" -gt 0 ] || models=(Nehalem Westmere SandyBridge Haswell-noTSX)
dir=target/vm-testbed/compare
mkdir -p "$dir"

for model in "${models[@]}"; do
    for n in $(seq "$boots"); do
        out=$dir/$model-measure-$n
        status=pass
        scripts/vm-testbed.sh --scenario measure --cpu "$model" --out "$out" --timeout 240 >"$out.log" 2>&1 || status=FAIL
        jq -r --arg s "$status" '"\(.cpu) measure \($s): boot A \(.a.boot_s) s B \(.b.boot_s) s, pipe \(.a.pipe_mib_s), urandom \(.a.urandom_mib_s), sha256 \(.a.sha256_mib_s), nc \(.a.net_nc_mib_s), socat \(.a.net_socat_mib_s) MiB/s; VMs \(.host_s.vms) s"' "$out/result.json" || echo "$model: no result ($out.log)"
    done
    for n in $(seq "$migrations"); do
        out=$dir/$model-migrate-$n
        status=pass
        scripts/vm-testbed.sh --scenario migrate --cpu "$model" --out "$out" --timeout 400 >"$out.log" 2>&1 || status=FAIL
        jq -r --arg s "$status" '"\(.cpu) migrate \($s): boot A \(.a.boot_s) s B \(.b.boot_s) s; " + (if .migration then (.migration | "downtime \(.downtime_ms) ms, dump \(.dump_ms) ms, restore \(.restore_ms) ms, wire \(.bytes_wire) B, transfer \((.bytes_wire / 1048576) / ((.transfer_and_restore_ms - .restore_ms) / 1000) * 10 | round / 10) MiB/s") else "no summary" end) + "; VMs \(.host_s.vms) s"' "$out/result.json" || echo "$model: no result ($out.log)"
    done
done
