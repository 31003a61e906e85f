# shellcheck shell=bash
# Host side of the VM test bed, sourced by scripts/vm-testbed.sh (which sets
# repo, tmp, out, cpu, mem, smp, kernel_dir and the qemu_pids array these
# functions use).
# shellcheck disable=SC2154
# Everything here logs to stderr; functions that produce a path print it
# on stdout.

# Debian's cloud kernel from bookworm-backports: 6.12, CONFIG_MEM_SOFT_DIRTY=y.
VM_KERNEL_META=linux-image-cloud-amd64
VM_BACKPORTS_SOURCE=/etc/apt/sources.list.d/migrate-bookworm-backports.sources

# Kernel modules the guests load (with their dependencies, resolved from
# modules.dep): the network device and entropy, overlayfs and veth/tun for
# containers, and what `criu check` and CRIU's dumps use (socket diag,
# netfilter for the network lock through iptables-nft).
VM_MODULES=(virtio_net virtio_rng overlay veth tun
    nfnetlink libcrc32c nf_tables nft_compat xt_mark nf_conntrack nf_conntrack_netlink
    inet_diag tcp_diag udp_diag raw_diag unix_diag netlink_diag af_packet_diag)

# Programs copied into the initramfs with the shared libraries ldd lists.
# GNU tar: CRIU dumps tmpfs mounts (the container's /dev) with it, and
# busybox tar lacks options it passes. iproute2's ip: CRIU saves and
# restores network namespaces with `ip addr save` etc. socat: copies between
# the VMs with 64 KiB buffers (busybox nc moves 1 KiB per syscall).
VM_PROGRAMS=(/usr/local/sbin/criu /usr/sbin/runc /usr/bin/tar /usr/bin/ip /usr/sbin/xtables-nft-multi /usr/bin/socat /usr/bin/jq)
VM_XTABLES_LINKS=(iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore
    iptables-nft iptables-nft-save iptables-nft-restore ip6tables-nft ip6tables-nft-save ip6tables-nft-restore)

vm_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

vm_qemu_ok() {
    local v
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
    [ -n "$v" ] && [ "$v" -ge 10 ]
}

# Installs what the test bed needs; idempotent, and without apt-get update
# when nothing is missing.
vm_install_deps() {
    # CRIU >= 4.2 (built from source when missing), runc, iptables,
    # busybox-static, iproute2, xz-utils.
    scripts/setup.sh
    local missing=() pkg updated=0
    for pkg in busybox-static cpio xz-utils tar kmod jq binutils iproute2 iptables runc socat; do
        vm_installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        updated=1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ ! -f "$VM_BACKPORTS_SOURCE" ]; then
        # Backports' default priority (100) keeps every other package on
        # bookworm: only what is asked for with -t comes from there.
        log "adding bookworm-backports ($VM_BACKPORTS_SOURCE)"
        cat >"$VM_BACKPORTS_SOURCE" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        updated=0
    fi
    if ! vm_qemu_ok; then
        # QEMU 7.2 (bookworm) crashes a TCG guest about one boot in five;
        # 10.0 from backports did not in any of our boots.
        log "installing qemu-system-x86 from bookworm-backports"
        [ "$updated" -eq 1 ] || apt-get update -qq
        updated=1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -t bookworm-backports qemu-system-x86 >/dev/null
        vm_qemu_ok || die "qemu-system-x86_64 >= 10 missing after installing it from bookworm-backports"
    fi
    command -v cargo >/dev/null || die "cargo is missing (the Rust toolchain is needed to build migrate)"
}

# Prints the directory of the cached cloud kernel (vmlinuz, lib/modules with
# modules.dep), downloading it on the first run. The newest cached one is
# used without asking apt; VM_TESTBED_REFRESH_KERNEL=1 checks for a newer.
vm_fetch_kernel() {
    local cache=$1 dir pkg kver dl
    dir=$(find "$cache" -mindepth 2 -maxdepth 2 -name .complete -printf '%h\n' 2>/dev/null | sort -V | tail -n1)
    if [ -n "$dir" ] && [ -z "${VM_TESTBED_REFRESH_KERNEL:-}" ]; then
        echo "$dir"
        return
    fi
    pkg=$(apt-cache depends -t bookworm-backports "$VM_KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends -t bookworm-backports "$VM_KERNEL_META" | awk '/Depends: linux-image-/ { print $2; exit }')
    fi
    [ -n "$pkg" ] || die "cannot resolve $VM_KERNEL_META in bookworm-backports"
    kver=${pkg#linux-image-}
    dir=$cache/$kver
    if [ -f "$dir/.complete" ]; then
        echo "$dir"
        return
    fi
    log "downloading $pkg (bookworm-backports) into $dir"
    rm -rf "$dir"
    dl=$dir/deb
    mkdir -p "$dl"
    # apt drops privileges to _apt for downloads; let it write there.
    chown _apt "$dl" 2>/dev/null || true
    (cd "$dl" && apt-get download -qq -t bookworm-backports "$pkg") >&2
    dpkg-deb -x "$dl"/*.deb "$dir/root"
    grep -q '^CONFIG_MEM_SOFT_DIRTY=y' "$dir/root/boot/config-$kver" || die "$pkg lacks CONFIG_MEM_SOFT_DIRTY"
    depmod -b "$dir/root" "$kver"
    ln -s "root/boot/vmlinuz-$kver" "$dir/vmlinuz"
    echo "$kver" >"$dir/version"
    rm -rf "$dl"
    : >"$dir/.complete"
    echo "$dir"
}

# Copies FILE (dereferenced) to the same path under ROOT, the directory part
# resolved (/lib is a link to usr/lib on bookworm).
vm_copy_file() {
    local root=$1 file=$2 dir
    dir=$(realpath "$(dirname "$file")")
    mkdir -p "$root$dir"
    cp -L "$file" "$root$dir/"
}

vm_copy_program() {
    local root=$1 prog=$2 lib
    [ -x "$prog" ] || die "$prog is missing"
    vm_copy_file "$root" "$prog"
    for lib in $(ldd "$prog" | awk '/=>/ { print $3 } $1 ~ /^\// { print $1 }'); do
        [ -e "$root$(realpath "$(dirname "$lib")")/$(basename "$lib")" ] || vm_copy_file "$root" "$lib"
    done
}

# Prints the modules' files in load order (dependencies first).
vm_module_order() {
    local moddir=$1
    shift
    awk -v want="$*" '
        function norm(p,   n) { n = p; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n); gsub(/-/, "_", n); return n }
        function visit(name,   i, n, d) {
            if (name in seen) return
            seen[name] = 1
            if (!(name in path)) { missing = missing " " name; return }
            n = split(deps[name], d, " ")
            for (i = 1; i <= n; i++) visit(norm(d[i]))
            print path[name]
        }
        FILENAME ~ /modules.builtin$/ { builtin[norm($0)] = 1; next }
        { f = $1; sub(/:$/, "", f); m = norm(f); path[m] = f; deps[m] = $0; sub(/^[^:]*: */, "", deps[m]) }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) { m = w[i]; gsub(/-/, "_", m); if (m in builtin) continue; visit(m) }
            if (missing != "") { print "missing modules:" missing > "/dev/stderr"; exit 1 }
        }' "$moddir/modules.builtin" "$moddir/modules.dep"
}

# Prints the path of the base initramfs (uncompressed newc cpio: the kernel
# unpacks it faster than it could decompress one under TCG): tools, kernel
# modules, the container layer. Cached under CACHE by a key over its inputs.
vm_base_initramfs() {
    local kernel_dir=$1 cache=$2 kver key image root moddir ko name prog
    kver=$(cat "$kernel_dir/version")
    key=$({
        echo "$kver"
        printf '%s\n' "${VM_MODULES[@]}" "${VM_PROGRAMS[@]}"
        sha256sum "${VM_PROGRAMS[@]}" /bin/busybox scripts/lib/vm.sh
    } | sha256sum | cut -c1-16)
    image=$cache/base-$key.cpio
    if [ -f "$image" ]; then
        echo "$image"
        return
    fi
    log "assembling the base initramfs ($image)"
    mkdir -p "$cache"
    root=$tmp/base
    rm -rf "$root"
    mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/sbin,usr/local/bin,etc,dev,proc,sys,newroot,tmp,run,var/lib,vm}
    ln -s usr/bin "$root/bin"
    ln -s usr/sbin "$root/sbin"
    ln -s usr/lib "$root/lib"
    ln -s usr/lib64 "$root/lib64"
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3

    cp /bin/busybox "$root/usr/bin/busybox"
    for prog in "${VM_PROGRAMS[@]}"; do
        vm_copy_program "$root" "$prog"
    done
    cp -a /usr/lib/x86_64-linux-gnu/xtables "$root/usr/lib/x86_64-linux-gnu/"
    for lib in $(ldd /usr/lib/x86_64-linux-gnu/xtables/*.so 2>/dev/null | awk '/=>/ { print $3 }' | sort -u); do
        [ -e "$root$(realpath "$(dirname "$lib")")/$(basename "$lib")" ] || vm_copy_file "$root" "$lib"
    done
    for name in "${VM_XTABLES_LINKS[@]}"; do
        ln -sf xtables-nft-multi "$root/usr/sbin/$name"
    done
    # Busybox for everything else (its applets never shadow a real tool).
    for name in $(/bin/busybox --list); do
        [ -e "$root/usr/bin/$name" ] || [ -e "$root/usr/sbin/$name" ] || ln -s busybox "$root/usr/bin/$name"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    cp /etc/protocols /etc/services "$root/etc/" 2>/dev/null || true
    mkdir -p "$root/root"

    moddir=$kernel_dir/root/lib/modules/$kver
    mkdir -p "$root/lib/modules/$kver"
    : >"$root/etc/vm-modules"
    for ko in $(vm_module_order "$moddir" "${VM_MODULES[@]}"); do
        name=$(basename "$ko")
        name=${name%.xz}
        # Busybox insmod cannot read xz-compressed modules.
        case "$ko" in
            *.xz) xz -dc "$moddir/$ko" >"$root/lib/modules/$kver/$name" ;;
            *) cp "$moddir/$ko" "$root/lib/modules/$kver/$name" ;;
        esac
        echo "/lib/modules/$kver/$name" >>"$root/etc/vm-modules"
    done

    # The container's image: a busybox rootfs, the overlay's lower layer.
    mkdir -p "$root/vm/layer"/{bin,dev,proc,sys,tmp,etc,root,var}
    cp /bin/busybox "$root/vm/layer/bin/busybox"
    for name in $(/bin/busybox --list); do
        [ "$name" = busybox ] || ln -s busybox "$root/vm/layer/bin/$name"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/vm/layer/etc/passwd"
    printf 'root:x:0:\n' >"$root/vm/layer/etc/group"
    (cd "$root/vm" && runc spec)
    jq '.process.terminal = false
        | .process.args = ["/bin/sh", "/workload.sh"]
        | .root = {path: "@ROOTFS@", readonly: false}
        | .linux.cgroupsPath = "/vm/heap"' "$root/vm/config.json" >"$root/vm/config.json.in"
    rm "$root/vm/config.json"

    (cd "$root" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0) >"$image.tmp"
    find "$cache" -maxdepth 1 -name 'base-*.cpio' ! -name "base-$key.cpio" -delete
    mv "$image.tmp" "$image"
    rm -rf "$root"
    echo "$image"
}

# Writes the per-run initramfs (a cpio appended to the base one) to stdout:
# /init, the scenario scripts, migrate and migrate-dst (stripped of debug
# info) with their shared libraries, and TLS material from `migrate certs` (one CA, a certificate per VM
# address) under /vm/tls/ADDR.
vm_run_initramfs() {
    local root=$1 release=$2 addr addr_role bin lib
    rm -rf "$root"
    mkdir -p "$root/vm" "$root/usr/local/bin"
    install -m 0755 scripts/vm/init "$root/init"
    cp scripts/vm/lib.sh scripts/vm/cases.sh scripts/vm/scenario-*.sh "$root/vm/"
    for bin in migrate migrate-dst; do
        strip --strip-debug -o "$root/usr/local/bin/$bin" "$release/$bin"
        # Their shared libraries (libgcc_s is not in the base image).
        for lib in $(ldd "$release/$bin" | awk '/=>/ { print $3 }'); do
            [ -e "$root$(realpath "$(dirname "$lib")")/$(basename "$lib")" ] || vm_copy_file "$root" "$lib"
        done
    done
    # The workload runs in the container: into its layer, with its
    # libraries and loader at their paths inside it.
    mkdir -p "$root/vm/layer/bin"
    strip --strip-debug -o "$root/vm/layer/bin/migrate-heap" "$release/migrate-heap"
    for lib in $(ldd "$release/migrate-heap" | grep -o '/[^ ]*' | sort -u); do
        mkdir -p "$root/vm/layer$(dirname "$lib")"
        cp -L "$lib" "$root/vm/layer$lib"
    done
    "$release/migrate" certs ca --out "$tmp/ca" >&2
    # VM A (10.77.0.1) is always the source, VM B (10.77.0.2) the destination.
    for addr_role in 10.77.0.1:source 10.77.0.2:destination; do
        addr=${addr_role%:*}
        "$release/migrate" certs issue --ca "$tmp/ca" --name "$addr" --role "${addr_role#*:}" \
            --out "$root/vm/tls/$addr" >&2
    done
    (cd "$root" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0)
}

# A free TCP port on loopback for the VMs' socket netdev.
vm_free_port() {
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 20000))
        ss -Htan "( sport = :$port or dport = :$port )" | grep -q . || { echo "$port"; return; }
    done
    die "no free port found"
}

# vm_boot ROLE ADDR PEER NETDEV_OPTS APPEND: starts a VM in the background.
vm_boot() {
    local role=$1 addr=$2 peer=$3 netopt=$4 append=$5
    qemu-system-x86_64 -accel tcg -cpu "$cpu" -m "$mem" -smp "$smp" \
        -nodefaults -no-user-config -display none -no-reboot \
        -kernel "$kernel_dir/vmlinuz" -initrd "$tmp/initrd" \
        -append "$append vm.role=$role vm.addr=$addr vm.peer=$peer" \
        -serial "file:$out/console-$role.log" -serial "file:$out/report-$role.log" \
        -netdev "socket,id=net0,$netopt" \
        -device "virtio-net-pci,netdev=net0,mac=52:54:00:77:00:0${addr##*.},romfile=" \
        -device virtio-rng-pci \
        </dev/null >"$out/qemu-$role.log" 2>&1 &
    qemu_pids+=("$!")
}

vm_wait_listen() {
    local port=$1 pid=$2
    for _ in $(seq 100); do
        ss -Hltn "sport = :$port" | grep -q . && return
        kill -0 "$pid" 2>/dev/null || die "QEMU of VM A exited: $(cat "$out/qemu-a.log")"
        sleep 0.1
    done
    die "QEMU of VM A does not listen on 127.0.0.1:$port"
}

# The status a VM reported ("pass", "fail" or "" if none yet).
vm_reported_status() {
    sed -n 's/^status "\(.*\)"\r\{0,1\}$/\1/p' "$out/report-$1.log" 2>/dev/null | tail -n1
}

# Waits for both VMs to power off, for at most TIMEOUT seconds. When one
# reports a failure the other is stopped (it would wait for its peer until
# the timeout). Returns 0 when both powered off by themselves.
vm_wait_all() {
    local limit=$1 start i role pid alive rc=0
    start=$SECONDS
    local -A done_at=()
    while :; do
        alive=0
        for i in 0 1; do
            role=$([ "$i" -eq 0 ] && echo a || echo b)
            pid=${qemu_pids[$i]}
            if kill -0 "$pid" 2>/dev/null; then
                alive=$((alive + 1))
            elif [ -z "${done_at[$role]:-}" ]; then
                done_at[$role]=$((SECONDS - start))
                wait "$pid" || { log "QEMU of VM ${role^^} exited with $?: $(tail -n 5 "$out/qemu-$role.log")"; rc=1; }
                log "VM ${role^^} powered off after ${done_at[$role]} s, reported: $(vm_reported_status "$role")"
            fi
        done
        [ "$alive" -gt 0 ] || return "$rc"
        for role in a b; do
            # A VM that failed, or powered off without a verdict (a crash):
            # its peer would wait for it until the timeout.
            if [ "$(vm_reported_status "$role")" = fail ] ||
                { [ -n "${done_at[$role]:-}" ] && [ -z "$(vm_reported_status "$role")" ]; }; then
                log "VM ${role^^} failed or stopped without a verdict: stopping the VMs"
                sleep 2
                for pid in "${qemu_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
                return 1
            fi
        done
        if [ $((SECONDS - start)) -ge "$limit" ]; then
            log "timeout: the VMs ran for ${limit} s; stopping them"
            for pid in "${qemu_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
            return 124
        fi
        sleep 0.5
    done
}

# The report of one VM as a JSON object (its "KEY JSON" lines).
vm_report_json() {
    tr -d '\r' <"$out/report-$1.log" 2>/dev/null |
        jq -Rn '[inputs | select(length > 0) | capture("^(?<k>[^ ]+) (?<v>.*)$")
                 | {(.k): (.v as $v | try ($v | fromjson) catch $v)}] | add // {}'
}

# vm_result OUT SCENARIO CPU MEM PREPARE_S VMS_S TOTAL_S HOST_STATUS
vm_result() {
    local a b
    a=$(vm_report_json a)
    b=$(vm_report_json b)
    jq -n --arg scenario "$2" --arg cpu "$3" --argjson mem "$4" \
        --argjson prepare "$5" --argjson vms "$6" --argjson total "$7" --argjson host "$8" \
        --argjson a "$a" --argjson b "$b" '{
            pass: ($host == 0 and $a.status == "pass" and $b.status == "pass"),
            scenario: $scenario, cpu: $cpu, mem_mib: $mem,
            host_s: {prepare: $prepare, vms: $vms, total: $total},
            migration: ($a.migration // null),
            a: $a, b: $b
        }'
}

vm_show_summary() {
    jq -r '
        "scenario \(.scenario), cpu \(.cpu): \(if .pass then "PASS" else "FAIL" end)",
        "  host: prepare \(.host_s.prepare) s, VMs \(.host_s.vms) s, total \(.host_s.total) s",
        (["a", "b"][] as $r | .[$r] as $v |
            "  VM \($r | ascii_upcase): boot \($v.boot_s // "?") s, AES-NI \($v.aes_ni // "?"), mem_dirty_track \($v.criu_mem_dirty_track // "?"), uffd-noncoop \($v.criu_uffd_noncoop // "?"), status \($v.status // "none")"),
        (.a.rounds // [] | .[] | "  round \(.round): \(.kind), \(.ms) ms in CRIU, \(.bytes) B of images, sent in \(.send_ms) ms"),
        (if .a.frozen_ms then "  frozen: \(.a.frozen_ms) ms" else empty end),
        (if .migration then "  migrate: \(.migration | tostring)" else empty end)
    ' "$1/result.json"
}
