"""How a daemon starts (`python -m tsd.daemon_entry`, the `tsd` command): tsd.daemon's
main, with TLS support left unloaded.

A daemon serves Unix sockets only, yet asyncio imports the ssl module where it
can (for TLS streams nobody here opens), and with it OpenSSL's libraries: about
4 MiB of the daemon's RSS and 8 ms of its start. A None entry in sys.modules
makes `import ssl` raise ImportError, which asyncio, like the standard
library's other optional users of ssl, takes as "no TLS on this Python". Only
this entry does it, before anything imports asyncio: a process that imports
tsd.daemon otherwise (tests, tools) keeps its ssl.
"""

from __future__ import annotations

import sys


def leave_out_tls() -> None:
    """Make `import ssl` fail in this process, unless it is loaded already."""
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    """Entry point of `tsd` (tsd.daemon.main)."""
    leave_out_tls()
    from tsd.daemon import main as daemon_main

    daemon_main(argv)


if __name__ == "__main__":
    main()
