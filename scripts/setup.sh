#!/usr/bin/env bash
# Installs what migrate needs on a Debian 12 host: CRIU >= 4.2 (built from
# Debian's sid source package when missing), runc, iptables (CRIU's network
# lock), busybox-static (the demo's rootfs), iproute2 and util-linux (nsenter),
# systemd (systemd-analyze, which checks the units in contrib/systemd/),
# socat (the workload tests copy it into their containers; the benchmark's
# plain TCP copies), zstd (the benchmark's manual pipeline) and linux-perf
# (the benchmark's --profile).
# Idempotent: every step is skipped when what it provides is already there.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { echo "setup.sh must run as root" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update() {
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
}

missing=()
for pkg in runc iptables busybox-static iproute2 util-linux procps socat zstd linux-perf ca-certificates xz-utils systemd; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_update
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# CRIU's page server (post-copy) needs pipes of at least 4 MiB: below that a
# lazy dump fails with "page-pipe: splice: Bad file descriptor". The agents
# raise it themselves when they need it; this makes it last across reboots.
sysctl_drop_in=/etc/sysctl.d/60-migrate.conf
if [ ! -f "$sysctl_drop_in" ]; then
    log "installing $sysctl_drop_in (fs.pipe-max-size = 4194304 for CRIU's lazy pages)"
    printf '# Written by migrate'"'"'s setup.sh: CRIU'"'"'s page server needs 4 MiB pipes.\nfs.pipe-max-size = 4194304\n' >"$sysctl_drop_in"
fi
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
    echo 4194304 >/proc/sys/fs/pipe-max-size
fi

criu_ok() {
    command -v criu >/dev/null 2>&1 || return 1
    local version major minor
    version=$(criu --version 2>/dev/null | sed -n 's/^Version: *//p')
    major=${version%%.*}
    minor=$(echo "$version" | cut -d. -f2)
    [ -n "$major" ] && [ -n "$minor" ] || return 1
    if [ "$major" -lt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -lt 2 ]; }; then
        return 1
    fi
    criu check >/dev/null 2>&1
}

if criu_ok; then
    log "criu $(criu --version | sed -n 's/^Version: *//p') present and passes criu check"
    exit 0
fi

# Debian 12's CRIU 3.17 fails `criu check` on recent kernels and 4.1 cannot dump
# sockets on kernels >= 6.16; 4.2.1 from sid's source package works. sid is
# added as deb-src only so that binaries keep coming from bookworm.
sid_src=/etc/apt/sources.list.d/migrate-sid-src.sources
if [ ! -f "$sid_src" ]; then
    log "adding sid deb-src entry for CRIU's source"
    cat >"$sid_src" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt_updated=0
fi
apt_update

build_deps=(build-essential libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
    python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev pkg-config libgnutls28-dev
    libnftables-dev uuid-dev libaio-dev dpkg-dev)
log "installing CRIU build dependencies"
apt-get install -y -qq --no-install-recommends "${build_deps[@]}" >/dev/null

workdir=/var/cache/migrate-criu-build
mkdir -p "$workdir"
cd "$workdir"
if ! ls criu_4.2*.orig.tar.xz >/dev/null 2>&1; then
    log "downloading CRIU source (sid)"
    # Only the orig tarball is relied upon (apt verifies its hash); the Debian
    # packaging files may fail to arrive, which is harmless here.
    apt-get source --download-only criu >/dev/null 2>&1 || true
fi
tarball=$(find . -maxdepth 1 -name 'criu_4.2*.orig.tar.xz' | sort -V | tail -n1)
[ -n "$tarball" ] || { echo "could not download CRIU >= 4.2 source from sid" >&2; exit 1; }
srcdir=$workdir/src
rm -rf "$srcdir"
mkdir -p "$srcdir"
tar -xf "$tarball" -C "$srcdir" --strip-components=1
log "building CRIU from $tarball"
make -C "$srcdir" -j"$(nproc)" criu >"$workdir/build.log" 2>&1 || { tail -n 40 "$workdir/build.log" >&2; exit 1; }
install -m 0755 "$srcdir/criu/criu" /usr/local/sbin/criu
# The build tree is a few hundred MB that nothing reads again.
rm -rf "$srcdir"
hash -r
criu_ok || { criu check >&2 || true; echo "built CRIU does not pass criu check" >&2; exit 1; }
log "installed criu $(criu --version | sed -n 's/^Version: *//p') to /usr/local/sbin/criu"
