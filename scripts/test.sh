#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh, the
# Quake test's game, and the VM test bed installs QEMU and its kernel), checks formatting and lints,
# then runs every test: unit tests, the end-to-end migrations between two
# network-namespace hosts with real CRIU and runc, a minute of fuzzing per
# target, and pre-copy between two QEMU VMs. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
# A test run builds once from clean: incremental caches only take disk.
export CARGO_INCREMENTAL=0

[ "$(id -u)" -eq 0 ] || { echo "scripts/test.sh must run as root (CRIU, runc, namespaces, mounts)" >&2; exit 1; }

scripts/setup.sh
# The Quake test's game (tests/tests/quake.rs): ioquake3's server and
# OpenArena's data.
# shellcheck source=scripts/lib/quake.sh
. scripts/lib/quake.sh
install_quake

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build"
cargo build --workspace --locked
# The corruption tests (tests/tests/resources.rs) need a `migrate` that
# corrupts a stream on request: the fault-injection feature, in its own
# target dir so that the normal binaries never have it.
echo "== build (fault-injection test build of migrate)"
cargo build -p migrate-src --features fault-injection --locked --target-dir target/fault-injection
# Only the binary is used; its dependencies' second build would stay on disk.
find target/fault-injection/debug -mindepth 1 -maxdepth 1 ! -name migrate -exec rm -rf {} +
echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# One test at a time: CRIU and runc use host-wide resources.
cargo test --workspace --locked -- --test-threads=1 2>&1 | tee "$log"
# One closing line for the cargo tests (cargo's last line is a doc-test
# summary that usually counts nothing).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?/) p += $(i-1); if ($i ~ /^failed;?/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

# Fuzzing (common/fuzz/README.md): the run above gave each target a few seconds; here each
# runs for a minute, from the corpus and the failures kept in common/fuzz/. A failure
# prints the smallest input found and the seed line for its regressions file.
echo "== fuzz: control-message decoder and archive extraction, 60 s per target"
MIGRATE_FUZZ_SECS=60 cargo test -p migrate-common --locked --test fuzz_control --test fuzz_archive

# Pre-copy needs soft-dirty memory tracking, which this kernel may lack:
# one pre-copy migration between two VMs whose kernel has it (a converging
# workload and one that outruns the link; see scripts/vm/README.md).
echo "== VM test bed: pre-copy"
scripts/vm-testbed.sh --scenario pre-copy
