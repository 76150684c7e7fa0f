# Where install.sh puts tsd and uninstall.sh takes it away; sourced by both.
# shellcheck shell=bash
VENV=/opt/tsd
BIN_DIR=/usr/local/bin
UNIT_DIR=/usr/local/lib/systemd/system
SYSUSERS_CONF=/usr/local/lib/sysusers.d/tsd.conf
TMPFILES_CONF=/usr/local/lib/tmpfiles.d/tsd.conf
MAN_PAGE=/usr/local/share/man/man1/ts.1
MAN_PAGE_TSD=/usr/local/share/man/man8/tsd.8
