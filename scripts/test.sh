#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh), checks
# formatting and lints, then runs every test: unit tests, and the end-to-end
# migrations between two network-namespace hosts with real CRIU and runc.
# Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "scripts/test.sh must run as root (CRIU, runc, namespaces, mounts)" >&2; exit 1; }

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build"
cargo build --workspace --locked
echo "== tests"
# One test at a time: CRIU and runc use host-wide resources.
cargo test --workspace --locked -- --test-threads=1
