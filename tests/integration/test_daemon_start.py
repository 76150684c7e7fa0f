"""What a daemon loads at its start (issue 10: its RSS with a big queue).

A daemon serves Unix sockets only: started the way `ts` starts it, it runs
without the ssl module and OpenSSL's libraries that asyncio would otherwise
load, and serves all the same.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from integration.harness import Env, Runner


def test_a_personal_daemon_serves_without_openssl_loaded(ts: Runner, tsd_env: Env) -> None:
    ts("-S")  # the first call starts the daemon
    pid = tsd_env.daemon_pid()
    assert pid is not None
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert not [line for line in maps.splitlines() if "libssl" in line or "_ssl." in line]
    job = ts("true").stdout.strip()
    assert ts("-S", "1").returncode == 0
    assert ts("-w", job, check=False).returncode == 0


def test_without_tls_asyncio_still_serves_a_unix_socket(tmp_path: Path) -> None:
    code = (
        "from tsd.daemon_entry import leave_out_tls\n"
        "leave_out_tls()\n"
        "import asyncio, sys\n"
        "try:\n"
        "    import ssl\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    sys.exit('ssl loaded')\n"
        "async def echo(r, w):\n"
        "    w.write(await r.readline()); await w.drain(); w.close()\n"
        "async def main():\n"
        f"    server = await asyncio.start_unix_server(echo, {str(tmp_path / 's')!r})\n"
        f"    r, w = await asyncio.open_unix_connection({str(tmp_path / 's')!r})\n"
        "    w.write(b'hi\\n'); print((await r.readline()).decode().strip())\n"
        "    w.close(); server.close()\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "hi"), out.stderr
