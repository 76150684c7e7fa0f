"""A submit request as it travels, built from a command line's option values.

Apart from tsd.cli_request (which parses a whole command line and picks its action)
so that `ts COMMAND...` with no options (tsd.plainsubmit) builds the very same
request without loading the option table: PLAIN_PARAMS are the values that table
gives a line with no options (tests/unit/test_plain_submit.py holds the two equal).
"""

# No `from __future__ import annotations` here: this module is on the way of
# `ts COMMAND` (tsd.plainsubmit), and that import loads __future__ (0.12 ms of each
# call). Annotations that name what only mypy imports are strings instead.

from tsd.errors import UsageError
from tsd.framing import PROTOCOL_VERSION

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    from collections.abc import Mapping, Sequence
    from typing import Any

# The values of the options submit_wire reads, on a command line that gives none.
PLAIN_PARAMS: "dict[str, Any]" = {
    "no_output": False, "gzip": False, "mail": False, "gpu_indices": None, "gpus": None,
    "array": None, "foreground": False, "depend_ok": None, "depend": None, "gpu_mem": None,
    "label": None, "num_slots": None, "stderr_apart": False, "output_name": None,
    "timeout": None, "begin": None, "priority": None, "retry": None, "depend_last": False,
    "no_block": False,
}  # fmt: skip


def clean_env(environ: "Mapping[str, str]") -> list[list[str]]:
    # Variables that cannot travel as UTF-8 JSON (undecodable bytes, odd names)
    # are left out rather than refusing the whole job.
    out = []
    for name, value in environ.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            continue
        try:
            name.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            continue
        out.append([name, value])
    return out


def submit_wire(
    params: "Mapping[str, Any]",
    present: set[str],
    command: "Sequence[str]",
    environ: "Mapping[str, str]",
    cwd: str | None,
    umask: int,
) -> "dict[str, Any]":
    """The submit request as it travels (tsd.protocol's `submit`, in spec_to_wire's order).

    Checks what only the command line can get wrong; the spec's own rules
    are tsd.protocol.parse_spec's, applied by whoever reads the request.
    """
    if cwd is None:
        raise UsageError("cannot queue a job: the current directory cannot be read")
    for word in command:
        try:
            word.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"the command word {word!r} is not valid UTF-8") from None
    if "depend" in present and "depend_ok" in present:
        raise UsageError("use either -D or -W, not both")
    no_output = bool(params["no_output"])
    gzip = bool(params["gzip"])
    if params["mail"] and (no_output or gzip):
        raise UsageError("for e-mail (-m), you should store the output (not -n, not -z)")
    gpu_indices = params["gpu_indices"]
    if "gpu_indices" in present and not gpu_indices:
        raise UsageError("-g needs GPU indices (e.g. -g 0,1) to queue a command")
    gpus = params["gpus"]
    if gpu_indices and gpus is not None and gpus != len(gpu_indices):
        raise UsageError(f"-G {gpus} disagrees with -g {','.join(map(str, gpu_indices))}")
    if params["array"] is not None and params["foreground"]:
        raise UsageError("--array cannot be used with -f (it queues many jobs)")
    depends = params["depend_ok"] or params["depend"] or ()
    gpu_mem = params["gpu_mem"]
    if gpu_mem is not None and gpus == 0:
        raise UsageError("--gpu-mem needs a GPU: not with -G 0")
    if gpu_mem is not None and not gpu_indices and gpus is None:
        gpus = 1  # --gpu-mem alone asks for one GPU with that much memory
    spec = {
        "command": list(command),
        "cwd": cwd,
        "env": clean_env(environ),
        "umask": umask,
        "label": params["label"],
        "slots": params["num_slots"] or 1,
        "gpus": len(gpu_indices) if gpu_indices else (gpus or 0),
        "gpu_indices": list(gpu_indices) if gpu_indices else None,
        "depends": list(depends),
        "depend_mode": "success" if "depend_ok" in present else "after",
        "store_output": not no_output,
        "gzip": gzip,
        "stderr_apart": bool(params["stderr_apart"]),
        "output_name": params["output_name"],
        "mail": bool(params["mail"]),
        "timeout": params["timeout"],
        "env_info": None,
        # -nf: task-spooler keeps no entry of a transparent job once it ends.
        "forget": no_output and bool(params["foreground"]),
        "begin": params["begin"],
        "priority": params["priority"] or 0,
        "retry": params["retry"] or 0,
        # An --array's elements get these from the daemon, never from ts.
        "array_job": None,
        "array_task": None,
        "array_throttle": None,
        "gpu_mem": gpu_mem,
    }
    return {
        "v": PROTOCOL_VERSION,
        "op": "submit",
        "spec": spec,
        "depend_last": bool(params["depend_last"]),
        "block": not params["no_block"],
        # -nf: one request queues and waits, as the job is forgotten when it ends.
        "wait": no_output and bool(params["foreground"]),
        "hold": "hold" in present,
        "array": params["array"],
    }
