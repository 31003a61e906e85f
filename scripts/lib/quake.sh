# shellcheck shell=bash
# The Quake demo's game server, shared by scripts/demo-quake.sh and the
# end-to-end test (tests/tests/quake.rs): Debian's ioquake3 dedicated server
# with OpenArena's game data, in a layer that holds only what the server
# reads. Sourced.
#
#   install_quake            installs ioquake3-server and openarena-server
#                            without starting the package's own server
#   make_quake_layer DIR     the server's layer (an overlay lower dir)
#   quake_server_args        the container's command line, one word a line
#
# The layer: /usr/lib/ioquake3/ioq3ded and the libraries ldd names for it,
# OpenArena's native game library (loaded from the layer: vm_game 0), and
# one pk3 with the map, its bot navigation file, the bots and default.cfg
# (the engine refuses to start without it), each taken from the pak that
# wins in the engine's own order (the last in name order). OpenArena's
# models, textures and sounds are for clients: they stay out.

QUAKE_MAP=oa_dm2
QUAKE_BOTS=(Sarge Grism Kyonshi Major)
QUAKE_BOT_SKILL=5
QUAKE_PORT=27960
QUAKE_RCON_PASSWORD=migrate-demo
QUAKE_DATA=/usr/share/games/openarena/baseoa
QUAKE_GAME_LIBRARY=/usr/lib/openarena-server/baseoa/qagamex86_64.so
QUAKE_SERVER=/usr/lib/ioquake3/ioq3ded

install_quake() {
    if [ -x "$QUAKE_SERVER" ] && [ -f "$QUAKE_GAME_LIBRARY" ] && [ -d "$QUAKE_DATA" ] &&
        command -v python3 >/dev/null; then
        return
    fi
    # python3: make_quake_layer builds the pk3 with its zipfile.
    echo "[quake] installing ioquake3-server openarena-server python3"
    # The package enables and starts a server of its own; the demo runs
    # its server in a container only. policy-rc.d tells the package
    # scripts not to start services, for this install only.
    local policy=/usr/sbin/policy-rc.d placed=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        placed=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        ioquake3-server openarena-server python3 >/dev/null || rc=$?
    [ -n "$placed" ] && rm -f "$policy"
    if [ "$rc" -ne 0 ]; then
        echo "[quake] apt-get install ioquake3-server openarena-server failed ($rc)" >&2
        return "$rc"
    fi
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now openarena-server.service >/dev/null 2>&1 || true
    fi
}

make_quake_layer() {
    local dir=$1
    mkdir -p "$dir"/{usr/lib/ioquake3,oa/baseoa,var/oa,tmp,dev,proc,sys,etc}
    cp "$QUAKE_SERVER" "$dir/usr/lib/ioquake3/"
    local lib
    # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)" and the loader's
    # "/lib64/ld-linux-x86-64.so.2 (0x…)".
    for lib in $(ldd "$QUAKE_SERVER" "$QUAKE_GAME_LIBRARY" |
        awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u); do
        mkdir -p "$dir$(dirname "$lib")"
        cp -L "$lib" "$dir$lib"
    done
    cp "$QUAKE_GAME_LIBRARY" "$dir/oa/baseoa/"
    python3 - "$QUAKE_DATA" "$QUAKE_MAP" "$dir/oa/baseoa/zz-migrate-demo.pk3" <<'PY'
import glob, re, sys, zipfile
data, game_map, out = sys.argv[1:]
wanted = re.compile(
    r"^(default\.cfg|maps/%s\.(bsp|aas)|botfiles/.*[^/]|scripts/(bots|arenas)\.txt|scripts/[^/]*\.(arena|bot))$"
    % re.escape(game_map))
chosen = {}
for pak in sorted(glob.glob(data + "/*.pk3")):
    with zipfile.ZipFile(pak) as z:
        for name in z.namelist():
            if wanted.match(name):
                chosen[name] = pak
for need in ("default.cfg", "maps/%s.bsp" % game_map, "maps/%s.aas" % game_map, "scripts/bots.txt"):
    if need not in chosen:
        sys.exit("%s is in none of %s/*.pk3" % (need, data))
# Fixed timestamps: the same data gives the same layer, byte for byte.
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as pk3:
    for name, pak in sorted(chosen.items()):
        with zipfile.ZipFile(pak) as z:
            pk3.writestr(zipfile.ZipInfo(name, (2015, 6, 22, 0, 0, 0)), z.read(name),
                         zipfile.ZIP_DEFLATED)
PY
}

# No tty console (CRIU cannot move a terminal), IPv4 only, a LAN server
# (dedicated 1: no heartbeats to master servers; the container has no
# route off its segment anyway), no frag or time
# limit (the scores only grow), and an rcon password (ioquake3's name for
# it: rcon_password leaves rcon unanswered).
quake_server_args() {
    local words=(
        "$QUAKE_SERVER"
        +set dedicated 1 +set ttycon 0 +set net_enabled 1 +set net_port "$QUAKE_PORT"
        +set com_basegame baseoa +set fs_basepath /oa +set fs_homepath /var/oa
        +set com_legacyprotocol 71 +set com_protocol 71 +set vm_game 0 +set sv_pure 0
        +set fraglimit 0 +set timelimit 0 +set rconPassword "$QUAKE_RCON_PASSWORD"
        +set bot_enable 1 +map "$QUAKE_MAP"
    )
    local bot
    for bot in "${QUAKE_BOTS[@]}"; do
        words+=(+addbot "$bot" "$QUAKE_BOT_SKILL")
    done
    printf '%s\n' "${words[@]}"
}
