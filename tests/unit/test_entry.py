"""The lean `ts` launcher's pieces: its text, and site loaded on demand (tsd/entry.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tsd.entry import script

REPO = Path(__file__).resolve().parents[2]


def lean_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run CODE as the launcher starts ts: python -S, the checkout appended, SiteOnDemand."""
    prologue = (
        "import sys\n"
        f"sys.path.append({str(REPO)!r})\n"
        "from tsd.entry import SiteOnDemand\n"
        "sys.meta_path.append(SiteOnDemand)\n"
    )
    return subprocess.run(
        [sys.executable, "-S", "-c", prologue + code], capture_output=True, text=True,
        timeout=60, cwd="/",
    )  # fmt: skip


def test_the_launcher_runs_python_without_site_and_imports_tsd_from_the_given_directory() -> None:
    text = script("/opt/tsd/bin/python", "/opt/tsd/lib/python3.11/site-packages")
    lines = text.splitlines()
    assert lines[0] == "#!/opt/tsd/bin/python -S"
    assert "sys.path.append('/opt/tsd/lib/python3.11/site-packages')" in lines
    assert lines[-2:] == ["from tsd.entry import main", "main()"]
    compile(text, "ts", "exec")  # a Python script, not only a shebang line


@pytest.mark.parametrize(
    "python, site",
    [("python3", "/usr/lib/python3/dist-packages"), ("/usr/bin/python3", "lib"),
     ("/opt/my tsd/bin/python", "/x"), ("/usr/bin/python3", "/x'); import os; ('")],
)  # fmt: skip
def test_the_launcher_refuses_relative_paths_blanks_and_quotes(python: str, site: str) -> None:
    with pytest.raises(ValueError, match="absolute path without blanks or quotes"):
        script(python, site)


def test_a_module_outside_the_standard_library_loads_site_and_is_found() -> None:
    # yaml lives in site-packages (the venv's or the system's), never on a -S path.
    proc = lean_python(
        "assert 'site' not in sys.modules\n"
        "import yaml\n"
        "from tsd.entry import SiteOnDemand\n"
        "print('site' in sys.modules, SiteOnDemand in sys.meta_path, sys.prefix)\n"
    )
    assert proc.returncode == 0, proc.stderr
    loaded, still_there, prefix = proc.stdout.split()
    assert (loaded, still_there) == ("True", "False")
    assert prefix == sys.prefix  # site's venv step ran too: the prefix is this venv's


def test_a_missing_standard_library_module_stays_missing_without_loading_site() -> None:
    # The standard library probes optional modules; a probe must not cost site's start.
    proc = lean_python(
        "try:\n"
        "    import _winapi\n"
        "except ImportError:\n"
        "    print('missing', 'site' in sys.modules)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["missing", "False"]


def test_a_module_found_nowhere_is_still_a_plain_import_error() -> None:
    proc = lean_python("import no_such_module_tsd_test\n")
    assert proc.returncode == 1
    assert "ModuleNotFoundError: No module named 'no_such_module_tsd_test'" in proc.stderr


def test_python_m_tsd_entry_prints_the_launcher_for_this_interpreter_and_checkout() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tsd.entry"], capture_output=True, text=True, timeout=60,
        cwd=str(REPO), check=True,
    )  # fmt: skip
    assert proc.stdout == script(sys.executable, str(REPO))
    bad = subprocess.run(
        [sys.executable, "-m", "tsd.entry", "--site", "relative"], capture_output=True,
        text=True, timeout=60, cwd=str(REPO),
    )  # fmt: skip
    assert bad.returncode == 2 and "absolute path" in bad.stderr and not bad.stdout


@pytest.mark.parametrize("safe_path", ["", "1"])
def test_a_tsd_beside_the_launcher_is_never_imported(tmp_path: Path, safe_path: str) -> None:
    # /usr/bin or a venv's bin is the script's directory: nothing of tsd's lives there, a
    # package put there must not stand in for the installed one (and it is not listed).
    bin_dir = tmp_path / "bin"
    (bin_dir / "tsd").mkdir(parents=True)
    (bin_dir / "tsd" / "__init__.py").write_text("raise SystemExit('the wrong tsd')\n")
    launcher = bin_dir / "ts"
    launcher.write_text(script(sys.executable, str(REPO)))
    launcher.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHONSAFEPATH": safe_path}
    proc = subprocess.run([str(launcher), "-V"], capture_output=True, text=True, timeout=60,
                          env=env, cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrong tsd" not in proc.stderr and proc.stdout.strip()
