#!/bin/bash
# Install tsd from this checkout onto this machine, and start it.
#
#   sudo packaging/install.sh [--no-apt] [--wheels DIR]
#
# What goes where (packaging/uninstall.sh removes exactly this):
#   /opt/tsd                               a venv (/usr/bin/python3 -m venv --system-site-packages,
#                                          so it uses Debian's python3-gi and python3-pydbus)
#                                          holding tsd and nvidia-ml-py
#   /usr/local/bin/ts, /usr/local/bin/tsd  links into /opt/tsd/bin (/opt/tsd/bin/ts is the
#                                          lean launcher of tsd/entry.py, not pip's script)
#   /usr/local/lib/systemd/system/         tsd.socket, tsd.service, tsd.slice
#   /usr/local/lib/sysusers.d/tsd.conf     group tsd
#   /usr/local/lib/tmpfiles.d/tsd.conf     /etc/tsd and /var/lib/tsd
#   /etc/tsd/tsd.yaml                      the example config, only if there is none
#                                          (an edited one is kept; the new example
#                                          goes to /etc/tsd/tsd.yaml.dist)
#   /usr/local/share/man/man1/ts.1         the man pages: ts(1)
#   /usr/local/share/man/man8/tsd.8        and tsd(8)
#   /usr/local/share/bash-completion/completions/ts, and for fish and zsh
#   /usr/local/share/fish/vendor_completions.d/ts.fish, /usr/local/share/zsh/site-functions/_ts
#                                          (what `_TS_COMPLETE=<shell>_source ts` prints;
#                                          bash-completion loads the bash one on first Tab)
#   /etc/profile.d/tsd-completion.sh       only where bash-completion is not installed
#                                          (--no-apt): loads it in login shells
#
# Running it again changes nothing when nothing changed in the checkout; after
# a change (an upgrade) it restarts tsd.service, whose running jobs keep running
# (KillMode=process: the supervisors survive, the new daemon re-adopts them).
# Where systemd is not running (a container, a chroot), everything is installed
# and enabled but nothing is started; `ts` then runs in personal mode.
#
# Options:
#   --no-apt       do not call apt-get (air-gapped machines): python3-venv,
#                  python3-gi, python3-pydbus, python3-psutil, python3-click,
#                  python3-yaml and dbus must be installed already (and
#                  bash-completion, for ts's completion in every new shell).
#   --wheels DIR   a directory with an nvidia-ml-py wheel, used before any index
#                  (packaging/wheels/ in the checkout is used when it exists).
set -euo pipefail

# shellcheck source=packaging/paths.sh
. "$(dirname "${BASH_SOURCE[0]}")/paths.sh"
CONF_DIR=/etc/tsd
COMPLETION_DIR=/usr/local/share/bash-completion/completions
FISH_COMPLETION_DIR=/usr/local/share/fish/vendor_completions.d
ZSH_COMPLETION_DIR=/usr/local/share/zsh/site-functions
# What the venv remembers about this installation.
SHARE="$VENV/share/tsd"

# python3-venv makes the venv; python3-setuptools and python3-wheel build tsd
# without reaching an index; the rest are tsd's own dependencies.
# bash-completion loads ts's completion in every interactive bash.
APT_PACKAGES=(python3 python3-venv python3-setuptools python3-wheel python3-gi python3-pydbus
              python3-psutil python3-click python3-yaml dbus bash-completion)

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USE_APT=1
WHEELS=""

say() { printf 'tsd install: %s\n' "$*"; }
die() { printf 'tsd install: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --no-apt) USE_APT=0 ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a directory"; WHEELS="$2"; shift ;;
        --wheels=*) WHEELS="${1#--wheels=}" ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

[ "$(id -u)" -eq 0 ] || die "run me as root: sudo $0"
[ -f "$SRC/tsd/__init__.py" ] && [ -f "$SRC/pyproject.toml" ] \
    || die "$SRC does not look like a tsd checkout"
if [ -z "$WHEELS" ] && [ -d "$SRC/packaging/wheels" ]; then
    WHEELS="$SRC/packaging/wheels"
fi

VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$SRC/tsd/__init__.py")"
[ -n "$VERSION" ] || die "no __version__ in $SRC/tsd/__init__.py"

# Set when anything installed changed; a running daemon is restarted then.
CHANGED=0
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# install_file SRC DEST MODE: copy unless DEST already has the same bytes.
install_file() {
    if [ -f "$2" ] && [ ! -L "$2" ] && cmp -s "$1" "$2"; then
        # Same bytes, but keep the mode right too.
        chmod "$3" "$2"
        return 0
    fi
    install -D -m "$3" "$1" "$2"
    say "installed $2"
    CHANGED=1
}

# link TARGET NAME: NAME -> TARGET; a foreign file in the way is kept aside.
link() {
    if [ -L "$2" ] && [ "$(readlink "$2")" = "$1" ]; then
        return 0
    fi
    if [ -e "$2" ] || [ -L "$2" ]; then
        if [ -L "$2" ] && [[ "$(readlink "$2")" == "$VENV"/* ]]; then
            rm -f "$2"
        else
            # e.g. task-spooler's own ts installed from source
            mv -f "$2" "$2.before-tsd"
            say "moved the existing $2 to $2.before-tsd (uninstall.sh puts it back)"
        fi
    fi
    mkdir -p "$(dirname "$2")"
    ln -s "$1" "$2"
    say "linked $2 -> $1"
    CHANGED=1
}

# ---------------------------------------------------------------- Debian packages
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$USE_APT" -eq 0 ]; then
        say "warning: --no-apt, and these Debian packages are not installed: ${missing[*]}"
    else
        say "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # Try without `apt-get update` first: the lists are often fresh enough,
        # and an offline machine may have the packages in its cache.
        if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
            apt-get update
            apt-get install -y --no-install-recommends "${missing[@]}"
        fi
    fi
fi
for mod in gi pydbus psutil click yaml; do
    /usr/bin/python3 -c "import $mod" 2>/dev/null \
        || die "/usr/bin/python3 cannot import $mod: install its Debian package (see --help)"
done

# ---------------------------------------------------------------- the venv
VPY="$VENV/bin/python"
if ! "$VPY" -c 'import sys; assert sys.prefix != sys.base_prefix' 2>/dev/null \
    || ! grep -qs '^include-system-site-packages = true' "$VENV/pyvenv.cfg"; then
    [ -e "$VENV" ] && say "replacing the broken or foreign venv at $VENV"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    say "made the venv $VENV"
    CHANGED=1
fi
export PIP_ROOT_USER_ACTION=ignore
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# nvidia-ml-py (pynvml): from PyPI, or a local wheel directory, or whatever
# /usr/bin/python3 already has (the venv sees the system's site-packages).
if "$VPY" -c 'import pynvml' 2>/dev/null; then
    :
else
    ok=0
    if [ -n "$WHEELS" ] && ls "$WHEELS"/nvidia_ml_py-*.whl >/dev/null 2>&1; then
        "${PIP[@]}" install --no-index --find-links "$WHEELS" nvidia-ml-py && ok=1
    fi
    if [ "$ok" -eq 0 ]; then
        # Short timeouts: an air-gapped machine should not wait minutes here.
        "${PIP[@]}" install --timeout 20 --retries 1 nvidia-ml-py && ok=1
    fi
    if [ "$ok" -eq 1 ]; then
        say "installed nvidia-ml-py into $VENV"
        CHANGED=1
    else
        say "WARNING: nvidia-ml-py could not be installed (no index reachable?)."
        say "WARNING: tsd runs, but without GPUs, until it is: put its wheel in a directory"
        say "WARNING: and rerun with --wheels DIR (pip download nvidia-ml-py elsewhere)."
    fi
fi

# tsd itself: built from a copy of the checkout (which may be read-only), and
# only when the sources differ from what is installed, so that a second run
# rewrites nothing.
mkdir -p "$TMP/src"
cp "$SRC/pyproject.toml" "$TMP/src/"
[ -f "$SRC/README.md" ] && cp "$SRC/README.md" "$TMP/src/"
[ -f "$SRC/LICENSE" ] && cp "$SRC/LICENSE" "$TMP/src/"
mkdir "$TMP/src/tsd"
cp "$SRC"/tsd/*.py "$TMP/src/tsd/"
SOURCE_SUM="$(cd "$TMP/src" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$SHARE/source.sha256" 2>/dev/null)" != "$SOURCE_SUM" ] \
    || ! "$VENV/bin/tsd" --version >/dev/null 2>&1; then
    if "$VPY" -c 'import setuptools, wheel' 2>/dev/null; then
        "${PIP[@]}" install --no-deps --no-index --no-build-isolation --force-reinstall "$TMP/src"
    else
        # No local build tools (--no-apt without python3-wheel): let pip fetch them.
        "${PIP[@]}" install --no-deps --force-reinstall "$TMP/src"
    fi
    mkdir -p "$SHARE"
    echo "$SOURCE_SUM" > "$SHARE/source.sha256"
    say "installed tsd $VERSION into $VENV"
    CHANGED=1
fi
got="$("$VENV/bin/tsd" --version 2>&1)" || die "the installed tsd does not run: $got"
# ts is the lean launcher (tsd/entry.py), not pip's console script: that one
# imports re and runs site.py over every .pth file, more than `ts true` costs.
# -I: the checkout in the current directory must not stand in for the installed tsd.
"$VPY" -I -m tsd.entry > "$TMP/ts.launcher" || die "python -m tsd.entry failed"
install_file "$TMP/ts.launcher" "$VENV/bin/ts" 0755

link "$VENV/bin/ts" "$BIN_DIR/ts"
link "$VENV/bin/tsd" "$BIN_DIR/tsd"

# ---------------------------------------------------------------- systemd files
# ExecStart= and ExecReload= (which checks the config before the SIGHUP) both run tsd.
sed "s|^\(Exec[A-Za-z]*=\)/usr/bin/tsd |\1$VENV/bin/tsd |" "$SRC/systemd/tsd.service" \
    > "$TMP/tsd.service"
grep -q "^ExecStart=$VENV/bin/tsd " "$TMP/tsd.service" \
    || die "systemd/tsd.service has no 'ExecStart=/usr/bin/tsd ...' line to point at $VENV"
grep -q "/usr/bin/tsd" "$TMP/tsd.service" \
    && die "systemd/tsd.service runs /usr/bin/tsd where $VENV/bin/tsd is installed"
install_file "$TMP/tsd.service" "$UNIT_DIR/tsd.service" 0644
install_file "$SRC/systemd/tsd.socket" "$UNIT_DIR/tsd.socket" 0644
install_file "$SRC/systemd/tsd.slice" "$UNIT_DIR/tsd.slice" 0644
install_file "$SRC/systemd/tsd.sysusers" "$SYSUSERS_CONF" 0644
install_file "$SRC/systemd/tsd.tmpfiles" "$TMPFILES_CONF" 0644

if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$SYSUSERS_CONF"
elif ! getent group tsd >/dev/null; then
    groupadd --system tsd
fi
if command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --create "$TMPFILES_CONF"
else
    install -d -m 0755 "$CONF_DIR"
    install -d -m 0700 /var/lib/tsd
fi

# ---------------------------------------------------------------- config
# Like dpkg's conffiles: the example is installed when there is no config, or
# when the config is the unedited example of the previous install; an admin's
# edited file is never touched.
EXAMPLE="$SRC/etc/tsd.yaml"
CONF="$CONF_DIR/tsd.yaml"
if [ ! -e "$CONF" ]; then
    install -D -m 0644 "$EXAMPLE" "$CONF"
    say "installed the example config $CONF"
elif cmp -s "$EXAMPLE" "$CONF"; then
    :
elif [ -f "$SHARE/tsd.yaml.example" ] && cmp -s "$SHARE/tsd.yaml.example" "$CONF"; then
    install -m 0644 "$EXAMPLE" "$CONF"
    say "updated $CONF (it was the unedited example of the previous version)"
else
    if ! cmp -s "$EXAMPLE" "$CONF.dist"; then
        install -m 0644 "$EXAMPLE" "$CONF.dist"
    fi
    say "kept your edited $CONF; this version's example is $CONF.dist (diff the two)"
fi
install_file "$EXAMPLE" "$SHARE/tsd.yaml.example" 0644
CONFIG_OK=1
if ! check="$("$VENV/bin/tsd" --check-config "$CONF" 2>&1)"; then
    CONFIG_OK=0
    say "WARNING: $check"
fi

# ---------------------------------------------------------------- man page, completion
if "$VPY" -c 'import tsd.manpage' 2>/dev/null; then
    "$VPY" -m tsd.manpage > "$TMP/ts.1"
    install_file "$TMP/ts.1" "$MAN_PAGE" 0644
    "$VPY" -m tsd.manpage tsd > "$TMP/tsd.8"
    install_file "$TMP/tsd.8" "$MAN_PAGE_TSD" 0644
else
    say "skipped the man page: this tsd has no tsd.manpage module"
fi
: > "$TMP/completions"
# What the installed ts prints: tsd/cli_completion.py is the one source of the scripts.
for shell in bash zsh fish; do
    case "$shell" in
        fish) dest="$FISH_COMPLETION_DIR/ts.fish" ;;
        zsh) dest="$ZSH_COMPLETION_DIR/_ts" ;;
        *) dest="$COMPLETION_DIR/ts" ;;  # bash-completion loads it by the command's name
    esac
    if _TS_COMPLETE="${shell}_source" "$VENV/bin/ts" > "$TMP/ts.$shell" 2>/dev/null \
        && grep -q 'ts' "$TMP/ts.$shell"; then
        install_file "$TMP/ts.$shell" "$dest" 0644
        echo "$dest" >> "$TMP/completions"
    else
        say "skipped the $shell completion: ts cannot print one"
    fi
done
# Without bash-completion (--no-apt), nothing reads $COMPLETION_DIR: login shells
# then load ts's completion through profile.d instead. With it the file is not
# needed, so it is not installed (and an earlier one is removed).
PROFILE_COMPLETION=/etc/profile.d/tsd-completion.sh
if [ -f "$COMPLETION_DIR/ts" ] && [ ! -f /usr/share/bash-completion/bash_completion ]; then
    {
        echo "# ts's completion for interactive bash, installed by tsd's install.sh"
        echo "# because bash-completion is not installed (with it, this is not needed)."
        echo 'if [ -n "${BASH_VERSION-}" ] && [ -n "${PS1-}" ] \'
        echo '    && [ -z "${BASH_COMPLETION_VERSINFO-}" ] && [ -r '"$COMPLETION_DIR/ts"' ]; then'
        echo "    . $COMPLETION_DIR/ts"
        echo "fi"
    } > "$TMP/tsd-completion.sh"
    install_file "$TMP/tsd-completion.sh" "$PROFILE_COMPLETION" 0644
    echo "$PROFILE_COMPLETION" >> "$TMP/completions"
elif [ -f "$PROFILE_COMPLETION" ]; then
    rm -f "$PROFILE_COMPLETION"
    say "removed $PROFILE_COMPLETION: bash-completion loads ts's completion now"
    CHANGED=1
fi
# uninstall.sh reads which completion files are ours from here.
install_file "$TMP/completions" "$SHARE/completions" 0644

# ---------------------------------------------------------------- start it
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    # The service is enabled too (not only the socket): queued jobs must start
    # after a reboot even when nobody runs ts.
    systemctl enable tsd.service tsd.socket 2>&1 | sed 's/^/tsd install: /'
    if systemctl -q is-active tsd.service; then
        if [ "$CHANGED" -eq 0 ]; then
            say "tsd.service is running and nothing changed: left alone"
        elif [ "$CONFIG_OK" -eq 0 ]; then
            say "WARNING: not restarting tsd.service: fix $CONF first, then: systemctl restart tsd"
        else
            systemctl restart tsd.service
            say "restarted tsd.service (running jobs keep running, queued jobs stay queued)"
        fi
    fi
    systemctl start tsd.socket
    systemctl -q is-active tsd.socket || die "tsd.socket did not start: journalctl -u tsd.socket"
    say "tsd $VERSION is installed and listening on /run/tsd/tsd.sock."
    say "Let users in with: usermod -aG tsd USER  (they log in again afterwards)"
else
    if command -v systemctl >/dev/null; then
        # Works offline: the units start at the next boot under systemd.
        systemctl enable tsd.service tsd.socket 2>&1 | sed 's/^/tsd install: /' || true
    fi
    say "tsd $VERSION is installed, but systemd is not running here (no /run/systemd/system),"
    say "so the system service could NOT be started. ts works in personal mode meanwhile:"
    say "each user's first ts call starts that user's own daemon."
fi
