"""The installed environment: the library never imports Prefect, flows run in ephemeral mode, and the
img2dataset `dataclasses` backport that breaks Prefect's server is absent."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_library_source_never_imports_prefect():
    offenders = [str(p) for p in (ROOT / "clipgen").rglob("*.py")
                 if any(line.lstrip().startswith(("import prefect", "from prefect"))
                        for line in p.read_text().splitlines())]
    assert offenders == []


def test_importing_every_library_module_loads_no_prefect():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                     for p in (ROOT / "clipgen").rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m.removesuffix('.__init__'))\n"
            "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
            "assert not bad, bad[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_dataclasses_backport_is_not_installed():
    spec = importlib.util.find_spec("dataclasses")
    assert "site-packages" not in spec.origin, f"the dataclasses backport shadows the stdlib: {spec.origin}"
    assert importlib.util.find_spec("img2dataset") is not None, "img2dataset missing: run make install"


def test_a_prefect_flow_runs_in_ephemeral_mode(tmp_path):
    code = ("from prefect import flow, task\n"
            "@task\ndef double(x): return 2 * x\n"
            "@flow\ndef f(x): return double(x) + 1\n"
            "import img2dataset  # imported beside Prefect on purpose: the backport broke exactly this\n"
            "print('result', f(20))\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "result 41" in out.stdout


def test_the_cli_turns_prefect_telemetry_off_and_waits_for_its_server_unless_told_otherwise():
    from clipgen.cli import set_prefect_defaults

    environ = {"DO_NOT_TRACK": "0"}
    set_prefect_defaults(environ)
    assert environ["DO_NOT_TRACK"] == "0"  # the user's own setting stands
    assert environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert int(environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) > 20  # Prefect's default


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["status", "--help"], ["judge", "--help"]])
def test_cli_help_is_useful(args):
    out = subprocess.run([sys.executable, "-m", "clipgen.cli", *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "usage: clipgen" in out.stdout
    assert len(out.stdout.splitlines()) > 5
