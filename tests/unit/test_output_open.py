"""Output files: the job creates only new ones, and ts reads only the job user's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tsd.cli_output import open_output
from tsd.errors import TsdError
from tsd.joboutput import create_new


def test_create_new_makes_a_private_file_and_refuses_anything_already_there(
    tmp_path: Path,
) -> None:
    fd = create_new(str(tmp_path / "new.log"), "-O")
    os.close(fd)
    assert (tmp_path / "new.log").stat().st_mode & 0o777 == 0o600
    (tmp_path / "target").write_text("keep\n")
    os.symlink(tmp_path / "target", tmp_path / "link.log")
    os.mkfifo(tmp_path / "fifo.log")
    for name in ("new.log", "link.log", "fifo.log"):
        with pytest.raises(FileExistsError, match="already exists"):
            create_new(str(tmp_path / name), "-O")
    assert (tmp_path / "target").read_text() == "keep\n"


def test_open_output_reads_only_a_regular_file_of_the_jobs_user(tmp_path: Path) -> None:
    me = os.getuid()
    out = tmp_path / "out"
    out.write_text("hello\n")
    fh = open_output(str(out), me)
    assert fh is not None and fh.read() == b"hello\n"
    fh.close()
    assert open_output(str(tmp_path / "missing"), me) is None
    os.symlink(out, tmp_path / "link")
    with pytest.raises(TsdError, match="symbolic link"):
        open_output(str(tmp_path / "link"), me)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(TsdError, match="not a regular file"):
        open_output(str(tmp_path / "fifo"), me)  # and it does not block on the FIFO
    with pytest.raises(TsdError, match="not to the job's user"):
        open_output(str(out), me + 1)


def test_mail_problem_names_why_the_mail_was_not_sent() -> None:
    from tsd.launch import mail_problem

    assert mail_problem(0) == ""
    assert "could not be run" in mail_problem(127 << 8)
    assert mail_problem(75 << 8) == "mail not sent: /usr/sbin/sendmail exited 75"
    assert mail_problem(9) == "mail not sent: /usr/sbin/sendmail killed by signal 9"
    assert mail_problem(None) == "mail not sent: /usr/sbin/sendmail did not run"
