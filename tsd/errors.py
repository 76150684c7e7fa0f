"""The TsdError tree: every failure a user can cause, with a stable wire code.

The daemon raises these; the server turns them into `{"ok": false, "code",
"error"}`; the client turns that back into the same class and the CLI prints
`ts: <message>` and exits with `exit_code`.
"""

# No `from __future__ import annotations` here: this module is on the way of
# `ts COMMAND` (tsd.plainsubmit), and that import loads __future__ (0.12 ms of each
# call). Annotations that name what only mypy imports are strings instead.


class TsdError(Exception):
    """Base of every error tsd reports to a user. `code` is stable on the wire."""

    code = "error"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(Exception):
    """A bad command line; printed as one `ts: ...` line, exit 1.

    The message names words the user typed, which may hold a newline or other
    control characters (`ts -$'\\n'`): they are escaped here, for every raiser,
    so the line stays one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(
            "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)
        )


class ProtocolError(TsdError):
    """A malformed, oversized or otherwise unreadable request or response."""

    code = "protocol"


class VersionMismatch(ProtocolError):
    """Client and daemon speak different protocol versions."""

    code = "version"


class BadRequest(TsdError):
    """A well-formed request whose values make no sense (bad id, bad flag value)."""

    code = "bad_request"


class NoSuchJob(TsdError):
    """The job id is unknown (never existed, or cleared)."""

    code = "no_such_job"


class NotOwner(TsdError):
    """The caller tried to act on another user's job."""

    code = "not_owner"


class PermissionDenied(TsdError):
    """The caller may not do this at all (not in group tsd, not an admin)."""

    code = "permission"


class WrongState(TsdError):
    """The job is in a state where this action does not apply (e.g. removing a running job)."""

    code = "wrong_state"


class NeverFits(TsdError):
    """The job asks for more slots or GPUs than the server or the user's quota allows."""

    code = "never_fits"


class QueueFull(TsdError):
    """The user's queue is full; with -B the client exits 2 instead of waiting."""

    code = "queue_full"
    exit_code = 2


class OverQuota(TsdError):
    """Storing this would pass one of the user's byte caps (max_job_bytes, max_stored_bytes)."""

    code = "over_quota"


class ConfigError(TsdError):
    """The config file is broken; the message names the file, key path and line."""

    code = "config"


class ServerUnavailable(TsdError):
    """The client cannot reach (or start) a daemon."""

    code = "unavailable"


class TooManyConnections(TsdError):
    """The caller holds as many connections (or waiting calls) as one user may."""

    code = "too_many_connections"


class StorageFull(TsdError):
    """The daemon's state directory is full: nothing was changed; retry once space returns."""

    code = "storage_full"

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


class ClientGone(TsdError):
    """The client hung up before its request was committed: nothing was done, nobody to tell."""

    code = "client_gone"


class ClusterRefused(TsdError):
    """The cluster (Slurm) refused or could not take a request; the message is its reason."""

    code = "cluster"


class Internal(TsdError):
    """A bug in tsd: reported as one line; the daemon keeps serving others."""

    code = "internal"


_BY_CODE: dict[str, type[TsdError]] = {}


def _register(cls: type[TsdError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(TsdError)


def from_wire(code: str, message: str) -> TsdError:
    """Rebuild the error a daemon reported; unknown codes become a plain TsdError."""
    return _BY_CODE.get(code, TsdError)(message)
