"""The lean `ts` program that install.sh and the Debian package install.

pip's console script for `ts` imports `re` (and with it enum, functools, ...)
to tidy argv[0] and runs under the interpreter's full start-up, site.py with
every .pth file of every site directory: together more than `ts true` itself
costs. The launcher `script` writes instead runs its Python with `-S` (no
site) and puts the one directory that holds tsd on sys.path itself, so an
everyday `ts` call loads the standard library's light modules and tsd's own
(tests/integration/test_client_path.py) and nothing else.

Everything else stays as the interpreter would have it: PYTHON* variables
(PYTHONPATH first on the path, PYTHONIOENCODING, ...) still apply, argv[0] is
the path `ts` was started by, `tsd.cli.main` chooses the exit code (or, for
`ts COMMAND...` with no options, tsd.plainsubmit, which the launcher calls before
it imports this module: the same request on a lighter path). Should a
rarely used path import a module outside the standard library (click, yaml,
a .pth-installed package), `SiteOnDemand` runs site.py's work at that moment
(site.main: site-packages, user site, .pth files, the venv's prefixes) and
the import goes on as it would have with site loaded at start.

    python -I -m tsd.entry [--python PY] [--site DIR]   # prints the launcher

With no options: the running interpreter and the directory this tsd is
imported from (the form install.sh writes over pip's console script).
"""

# No `from __future__ import annotations` here: this module is on the way of
# `ts COMMAND` (tsd.plainsubmit), and that import loads __future__ (0.12 ms of each
# call). Annotations that name what only mypy imports are strings instead.

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType


class SiteOnDemand:
    """Meta path finder of last resort: loads site.py's paths on the first miss outside stdlib.

    Asked only when every other finder failed. A standard library module that
    is not there (the stdlib probes optional ones) is really absent and stays
    a miss; any other top-level name gets one run of `site.main()`, after which
    this finder leaves sys.meta_path and the import is retried by the finders
    site left in place.
    """

    @classmethod
    def find_spec(
        cls, name: str, path: "Sequence[str] | None" = None, target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        """The spec of NAME once site's directories are on the path, or None."""
        if path is not None or name in sys.stdlib_module_names:
            return None
        if cls in sys.meta_path:
            sys.meta_path.remove(cls)
        import site

        site.main()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                return spec  # type: ignore[no-any-return]
        return None


def main() -> None:
    """Run `ts` as the launcher does: with site.py's paths loaded only when needed."""
    if sys.flags.no_site and SiteOnDemand not in sys.meta_path:
        sys.meta_path.append(SiteOnDemand)
    from tsd.cli import main as ts_main

    ts_main()


def script(python: str, site_dir: str) -> str:
    """The text of the `ts` launcher run by PYTHON, importing tsd from SITE_DIR."""
    for what, value in (("python", python), ("site directory", site_dir)):
        if not value.startswith("/") or any(c in value for c in "\n\r\t \"'\\"):
            raise ValueError(f"the {what} must be an absolute path without blanks or quotes: "
                             f"{value!r}")
    # The kernel passes everything after the interpreter's path as one argument:
    # -S alone, so that PYTHON* variables keep working as they do for any script.
    return (
        f"#!{python} -S\n"
        "# ts of tsd: a lean launcher written by tsd.entry (see its docstring).\n"
        "# Python starts without site.py; tsd's directory is put on the path here.\n"
        "import sys\n"
        "# Not the directory this file is in, as -P would have it: nothing of tsd's lives\n"
        "# there, and the first import would list it (/usr/bin: ~0.7 ms of every call).\n"
        "if not sys.flags.safe_path:\n"
        "    del sys.path[0]\n"
        f"sys.path.append('{site_dir}')\n"
        "# ts COMMAND... goes straight to its light path (tsd.plainsubmit), which returns\n"
        "# where it does not apply (TS_ENV set, say); all else goes through tsd.entry.main.\n"
        "if len(sys.argv) > 1 and not sys.argv[1].startswith('-'):\n"
        "    from tsd.plainsubmit import run_if_plain\n"
        "    run_if_plain(sys.argv[1:])\n"
        "from tsd.entry import main\n"
        "main()\n"
    )


def _print_script(argv: "Sequence[str]") -> int:
    import argparse
    from pathlib import Path

    import tsd

    parser = argparse.ArgumentParser(prog="python -m tsd.entry", description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run ts")
    parser.add_argument(
        "--site", default=str(Path(tsd.__file__).resolve().parent.parent),
        help="the directory holding the tsd package",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(script(args.python, args.site))
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(_print_script(sys.argv[1:]))
