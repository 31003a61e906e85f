# shellcheck shell=bash
# Root filesystem helpers for the scripts' containers. Sourced.
#
#   rootfs_install_binary LAYER BINARY [PATH]
#       copies BINARY into the layer dir LAYER at PATH (default
#       /bin/<name>), with every shared library `ldd` lists for it and the
#       dynamic loader, each at the same path as on this host, so that a
#       dynamically linked program (migrate-heap) runs in a busybox rootfs.
#       Fails if BINARY needs a library this host lacks.

rootfs_install_binary() {
    local layer=$1 binary=$2
    local dest=${3:-/bin/$(basename "$binary")}
    [ -d "$layer" ] || { echo "rootfs_install_binary: no layer dir $layer" >&2; return 1; }
    [ -x "$binary" ] || { echo "rootfs_install_binary: $binary is not an executable" >&2; return 1; }
    mkdir -p "$layer$(dirname "$dest")"
    install -m 0755 "$binary" "$layer$dest"

    local deps
    if ! deps=$(ldd "$binary" 2>&1); then
        # A static binary needs nothing more.
        case $deps in
            *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
            *) echo "rootfs_install_binary: ldd $binary: $deps" >&2; return 1 ;;
        esac
    fi
    if grep -q "not found" <<<"$deps"; then
        echo "rootfs_install_binary: $binary needs libraries this host lacks:" >&2
        grep "not found" <<<"$deps" >&2
        return 1
    fi
    # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" for libraries,
    # "/lib64/ld-linux-x86-64.so.2 (0x...)" for the loader; the vDSO has
    # no path. Copies follow symlinks: the layer gets real files.
    local lib
    while read -r lib; do
        mkdir -p "$layer$(dirname "$lib")"
        cp -L "$lib" "$layer$lib"
    done < <(grep -o '/[^ ]*' <<<"$deps" | sort -u)
}
