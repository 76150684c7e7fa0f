#!/bin/bash
# Build the Debian package of tsd from this checkout, with one command:
#
#   packaging/build-deb.sh [--version VERSION] [--out DIR] [--pynvml FILE]
#
# -> packaging/out/tsd_<version>_all.deb (or DIR/...). Needs dpkg-deb and gzip
# only (no debhelper, no root). The version is tsd/__init__.py's (which must
# agree with pyproject.toml); --version builds another one, e.g. a local
# rebuild 0.1.0+site1, and writes it into the packaged tsd/__init__.py so that
# `ts -V` and `tsd --version` report what dpkg reports.
#
# nvidia-ml-py is not packaged by Debian 12. Its pynvml.py is one pure-Python
# file under a BSD licence, so it is vendored: it goes to /usr/lib/tsd/vendor,
# which a .pth file appends to /usr/bin/python3's sys.path (after the
# system's own site-packages, so a pynvml installed another way wins). It is
# taken from --pynvml FILE, else from the nvidia-ml-py wheel that
# `pip download` fetches, else from a pynvml importable here (the checkout's
# .venv, then /usr/bin/python3).
#
# The maintainer scripts are packaging/debian/{postinst,prerm,postrm}.
# SOURCE_DATE_EPOCH is honoured (else the last commit's time) so that two
# builds of the same tree give the same package.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$SRC/packaging/out"
VERSION=""
PYNVML=""

say() { printf 'build-deb: %s\n' "$*"; }
die() { printf 'build-deb: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --version) [ $# -ge 2 ] || die "--version needs a value"; VERSION="$2"; shift ;;
        --version=*) VERSION="${1#--version=}" ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        --pynvml) [ $# -ge 2 ] || die "--pynvml needs a file"; PYNVML="$2"; shift ;;
        --pynvml=*) PYNVML="${1#--pynvml=}" ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (apt-get install dpkg)"

CODE_VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$SRC/tsd/__init__.py")"
PROJECT_VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$SRC/pyproject.toml")"
[ -n "$CODE_VERSION" ] || die "no __version__ in tsd/__init__.py"
[ "$CODE_VERSION" = "$PROJECT_VERSION" ] \
    || die "tsd/__init__.py says $CODE_VERSION but pyproject.toml says $PROJECT_VERSION"
VERSION="${VERSION:-$CODE_VERSION}"
[[ "$VERSION" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || die "not a Debian version: $VERSION"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git -C "$SRC" log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/tsd_$VERSION"
PYDIR="$ROOT/usr/lib/python3/dist-packages"
VENDOR="$ROOT/usr/lib/tsd/vendor"
DOC="$ROOT/usr/share/doc/tsd"

# ---------------------------------------------------------------- pynvml.py
if [ -z "$PYNVML" ]; then
    mkdir "$WORK/wheel"
    for py in python3 "$SRC/.venv/bin/python"; do
        if "$py" -m pip --version >/dev/null 2>&1 \
            && "$py" -m pip download -q --disable-pip-version-check --no-deps \
                --only-binary=:all: --timeout 20 --retries 1 -d "$WORK/wheel" nvidia-ml-py \
                >/dev/null 2>&1; then
            break
        fi
    done
    whl="$(ls "$WORK"/wheel/nvidia_ml_py-*.whl 2>/dev/null | head -n1 || true)"
    if [ -n "$whl" ]; then
        (cd "$WORK/wheel" && python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("pynvml.py")' "$whl")
        PYNVML="$WORK/wheel/pynvml.py"
        PYNVML_FROM="$(basename "$whl")"
    else
        for py in "$SRC/.venv/bin/python" python3; do
            if f="$("$py" -c 'import pynvml; print(pynvml.__file__)' 2>/dev/null)"; then
                PYNVML="$f"
                break
            fi
        done
        [ -n "$PYNVML" ] || die "no pynvml.py: pip download nvidia-ml-py failed and none is \
importable here; pass --pynvml FILE (the pynvml.py of an nvidia-ml-py wheel)"
        PYNVML_FROM="$PYNVML"
    fi
else
    PYNVML_FROM="$PYNVML"
fi
[ -f "$PYNVML" ] && grep -q 'nvmlInit' "$PYNVML" || die "$PYNVML is not pynvml.py"
say "pynvml.py from $PYNVML_FROM"

# ---------------------------------------------------------------- the tree
install -d "$PYDIR/tsd" "$VENDOR" "$ROOT/usr/bin" "$DOC" "$ROOT/DEBIAN"
install -m 0644 "$SRC"/tsd/*.py "$PYDIR/tsd/"
sed -i "s/^__version__ = \".*\"$/__version__ = \"$VERSION\"/" "$PYDIR/tsd/__init__.py"
install -m 0644 "$PYNVML" "$VENDOR/pynvml.py"
echo "/usr/lib/tsd/vendor" > "$PYDIR/tsd-vendor.pth"
chmod 0644 "$PYDIR/tsd-vendor.pth"

# ts: the lean launcher of tsd/entry.py (python3 -S, dist-packages put on the path by
# the script itself), not a script that runs site.py over every .pth file on each call.
# -P: a tsd in the current directory must not stand in for the packaged one.
PYTHONPATH="$PYDIR" python3 -P -m tsd.entry --python /usr/bin/python3 \
    --site /usr/lib/python3/dist-packages > "$ROOT/usr/bin/ts" || die "python -m tsd.entry failed"
cat > "$ROOT/usr/bin/tsd" <<EOF
#!/usr/bin/python3
# tsd from the tsd package (tsd.daemon.main, without TLS: tsd.daemon_entry).
from tsd.daemon_entry import main

main()
EOF
chmod 0755 "$ROOT/usr/bin/ts" "$ROOT/usr/bin/tsd"

install -D -m 0644 -t "$ROOT/usr/lib/systemd/system" \
    "$SRC/systemd/tsd.socket" "$SRC/systemd/tsd.service" "$SRC/systemd/tsd.slice"
grep -q '^ExecStart=/usr/bin/tsd ' "$ROOT/usr/lib/systemd/system/tsd.service" \
    || die "systemd/tsd.service does not run /usr/bin/tsd"
install -D -m 0644 "$SRC/systemd/tsd.sysusers" "$ROOT/usr/lib/sysusers.d/tsd.conf"
install -D -m 0644 "$SRC/systemd/tsd.tmpfiles" "$ROOT/usr/lib/tmpfiles.d/tsd.conf"
install -D -m 0644 "$SRC/etc/tsd.yaml" "$ROOT/etc/tsd/tsd.yaml"

# The man page, generated from ts's option table with the packaged code
# (standard library only: any python3 will do).
if [ -f "$PYDIR/tsd/manpage.py" ]; then
    install -d "$ROOT/usr/share/man/man1"
    PYTHONPATH="$PYDIR" python3 -m tsd.manpage > "$WORK/ts.1" \
        || die "python -m tsd.manpage failed"
    gzip -9n < "$WORK/ts.1" > "$ROOT/usr/share/man/man1/ts.1.gz"
    install -d "$ROOT/usr/share/man/man8"
    PYTHONPATH="$PYDIR" python3 -m tsd.manpage tsd > "$WORK/tsd.8" \
        || die "python -m tsd.manpage tsd failed"
    gzip -9n < "$WORK/tsd.8" > "$ROOT/usr/share/man/man8/tsd.8.gz"
else
    say "no man page: this tsd has no tsd/manpage.py"
fi
# Shell completion: what the packaged ts prints itself (tsd/cli_completion.py is the
# one source of these scripts; none is kept in the checkout to drift from it).
for shell in bash zsh fish; do
    case "$shell" in
        fish) dest=usr/share/fish/vendor_completions.d/ts.fish ;;
        zsh) dest=usr/share/zsh/vendor-completions/_ts ;;
        *) dest=usr/share/bash-completion/completions/ts ;;
    esac
    install -d "$(dirname "$ROOT/$dest")"
    _TS_COMPLETE="${shell}_source" PYTHONPATH="$PYDIR" python3 -m tsd.cli > "$ROOT/$dest" \
        || die "_TS_COMPLETE=${shell}_source ts failed"
    grep -q 'ts' "$ROOT/$dest" || die "no $shell completion from ts"
    chmod 0644 "$ROOT/$dest"
done

[ -f "$SRC/README.md" ] && gzip -9n < "$SRC/README.md" > "$DOC/README.md.gz"
{
    cat <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tsd

Files: *
License: GPL-2.0-or-later
 On Debian systems, the complete text of the GNU General Public License
 version 2 can be found in /usr/share/common-licenses/GPL-2.

Files: usr/lib/tsd/vendor/pynvml.py
Comment: pynvml.py of nvidia-ml-py (from $PYNVML_FROM), vendored because
 Debian 12 does not package it.
Copyright: NVIDIA Corporation
License: BSD-3-clause
EOF
    # The licence text, as the file itself states it.
    sed -n '2,/^#####$/p' "$PYNVML" | sed '$d; s/^# \{0,1\}//; s/^$/./; s/^/ /'
} > "$DOC/copyright"
chmod 0644 "$DOC/copyright" "$DOC"/*.gz 2>/dev/null || true

# ---------------------------------------------------------------- DEBIAN/
for script in postinst prerm postrm; do
    install -m 0755 "$SRC/packaging/debian/$script" "$ROOT/DEBIAN/$script"
done
echo /etc/tsd/tsd.yaml > "$ROOT/DEBIAN/conffiles"
(cd "$ROOT" && find usr -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum) \
    > "$ROOT/DEBIAN/md5sums"
SIZE="$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)"
cat > "$ROOT/DEBIAN/control" <<EOF
Package: tsd
Version: $VERSION
Architecture: all
Maintainer: tsd developers <tsd@localhost>
Installed-Size: $SIZE
Depends: python3 (>= 3.11), python3-pydbus, python3-gi, python3-psutil, python3-click, python3-yaml, dbus, systemd
Recommends: bash-completion
Section: admin
Priority: optional
Description: multi-user GPU task spooler for shared servers
 tsd queues users' commands and runs them, each as its owner in a systemd
 scope, when slots and GPUs are free and the user is within the server's
 quotas. Its client ts is flag-compatible with GPU Task Spooler
 (task-spooler): ts CMD, ts -l, ts -w, ts -G 2 CMD.
 .
 The system service is socket-activated (/run/tsd/tsd.sock, group tsd);
 add users with: usermod -aG tsd USER. Config: /etc/tsd/tsd.yaml.
EOF

# Same tree, same bytes: fixed times and owners (root:root via dpkg-deb).
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$OUT"
DEB="$OUT/tsd_${VERSION}_all.deb"
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
say "built $DEB"
