"""What benchmarks/gpu.sh needs on a GPU host that has only PyTorch's image: the benchmarks and the GPU
tests import nothing that host lacks (prefect, open_clip, webdataset, faiss, torch-fidelity)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKED_IMPORTS = '''
import importlib.abc, runpy, sys
ABSENT = {"prefect", "open_clip", "webdataset", "faiss", "torch_fidelity"}

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError(f"{name} is not on the GPU host")

sys.meta_path.insert(0, Absent())
sys.path.insert(0, "benchmarks")
for script in ("benchmarks/sample.py", "benchmarks/train_gpt.py"):
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        assert exit.code in (0, None), (script, exit.code)
runpy.run_path("tests/test_gpu.py")
print("imports ok")
'''


def test_the_gpu_benchmarks_and_tests_import_only_what_the_gpu_host_has():
    proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "imports ok" in proc.stdout, proc.stderr[-3000:]


def test_gpu_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")]).returncode == 0
