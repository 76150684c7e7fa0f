#!/bin/bash
# Remove what packaging/install.sh installed.
#
#   sudo packaging/uninstall.sh [--purge]
#
# Stops and disables tsd.socket and tsd.service, then removes the units, the
# sysusers/tmpfiles files, the venv /opt/tsd, the links in /usr/local/bin, the
# man page and the shell completions. Jobs that are running when the service
# stops keep running to their end (KillMode=process).
#
# Kept unless --purge: /etc/tsd (the config) and /var/lib/tsd (the queue and
# the finished jobs). Always kept: group tsd, because files may belong to it
# (remove it with `groupdel tsd`).
set -euo pipefail

# shellcheck source=packaging/paths.sh
. "$(dirname "${BASH_SOURCE[0]}")/paths.sh"

PURGE=0
say() { printf 'tsd uninstall: %s\n' "$*"; }
die() { printf 'tsd uninstall: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
[ "$(id -u)" -eq 0 ] || die "run me as root: sudo $0"

remove() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        rm -rf -- "$1"
        say "removed $1"
    fi
}

if [ -d /run/systemd/system ]; then
    # The socket first, so that no connection starts the service again.
    for unit in tsd.socket tsd.service; do
        if systemctl -q is-active "$unit"; then
            systemctl stop "$unit"
            say "stopped $unit"
        fi
    done
fi
if command -v systemctl >/dev/null && [ -f "$UNIT_DIR/tsd.service" ]; then
    # Works without a running systemd too (it only removes symlinks then).
    systemctl disable tsd.service tsd.socket 2>&1 | sed 's/^/tsd uninstall: /' || true
fi

for f in tsd.socket tsd.service tsd.slice; do
    remove "$UNIT_DIR/$f"
done
remove "$SYSUSERS_CONF"
remove "$TMPFILES_CONF"

# The links, only when they are ours; put back what install.sh moved aside.
for name in ts tsd; do
    path="$BIN_DIR/$name"
    if [ -L "$path" ] && [[ "$(readlink "$path")" == "$VENV"/* ]]; then
        remove "$path"
    fi
    if [ -e "$path.before-tsd" ] && [ ! -e "$path" ]; then
        mv "$path.before-tsd" "$path"
        say "put back $path"
    fi
done
remove "$MAN_PAGE"
remove "$MAN_PAGE_TSD"
if [ -f "$VENV/share/tsd/completions" ]; then
    while read -r path; do
        case "$path" in
            /usr/local/share/*|/etc/profile.d/tsd-completion.sh) remove "$path" ;;
        esac
    done < "$VENV/share/tsd/completions"
fi
remove "$VENV"

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed tsd.service tsd.socket 2>/dev/null || true
fi

if [ "$PURGE" -eq 1 ]; then
    remove /etc/tsd
    remove /var/lib/tsd
    say "purged the config and the state; group tsd is kept (groupdel tsd removes it)"
else
    say "kept /etc/tsd (config) and /var/lib/tsd (queue and finished jobs); --purge removes them"
fi
