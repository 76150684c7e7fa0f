"""Names the ts client and the daemon must agree on, in one leaf module.

It imports nothing, so the `ts` client can use it without slowing its start,
and a path or group renamed here is renamed on both sides at once.
"""

# No `from __future__ import annotations` here: this module is on the way of
# `ts COMMAND` (tsd.plainsubmit), and that import loads __future__ (0.12 ms of each
# call). Annotations that name what only mypy imports are strings instead.

SYSTEM_SOCKET = "/run/tsd/tsd.sock"  # the system daemon's socket (DESIGN.md)
SYSTEM_CONFIG = "/etc/tsd/tsd.yaml"  # the admin's config
SYSTEM_STATE = "/var/lib/tsd"  # the system daemon's state directory
SUBMIT_GROUP = "tsd"  # members may use the system daemon
SENDMAIL = "/usr/sbin/sendmail"  # -m, as task-spooler
