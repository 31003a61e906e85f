# shellcheck shell=bash
# Timestamps of CRIU's steps, for runs of runc checkpoint / restore that the
# scripts time themselves. Sourced.
#
#   criu_timing_config DIR     writes DIR/criu.conf (give it to runc as
#                              CRIU_CONFIG_FILE) whose action script appends
#                              "<action> <ns since the epoch>" to DIR/actions
#   criu_action_ms DIR ACTION  the first time ACTION ran, in ms since the epoch
#
# CRIU reads CRIU_CONFIG_FILE in every mode, runc's RPC one included, so the
# operator's /etc/criu/runc.conf stays untouched. Actions of interest:
# pre-dump (just before CRIU freezes the tasks), post-dump, pre-restore,
# post-restore, pre-resume, post-resume (the restored tasks run).

criu_timing_config() {
    local dir=$1
    mkdir -p "$dir"
    cat >"$dir/action.sh" <<EOF
#!/bin/sh
echo "\$CRTOOLS_SCRIPT_ACTION \$(date +%s%N)" >>'$dir/actions'
EOF
    chmod 0755 "$dir/action.sh"
    echo "action-script $dir/action.sh" >"$dir/criu.conf"
}

criu_action_ms() {
    local dir=$1 action=$2 ns
    ns=$(awk -v a="$action" '$1 == a { print $2; exit }' "$dir/actions" 2>/dev/null)
    [ -n "$ns" ] || { echo "CRIU never ran its $action action ($dir/actions)" >&2; return 1; }
    echo $((ns / 1000000))
}
