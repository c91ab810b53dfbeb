"""What every benchmark result carries (device, commit, date, versions), and a JSON report that is rewritten
after each finished row, so a run stopped by a timeout still leaves the rows it measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """This checkout's commit (``+dirty`` with uncommitted changes); else $GIT_COMMIT (a copied tree)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT", "unknown")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} cpu x{os.cpu_count()}"


def run_info(device: torch.device) -> dict:
    return {"device": device_name(device), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}


class Report:
    """``{"benchmark": name, **run_info, **settings, "results": [...]}``, saved to ``path`` after each row."""

    def __init__(self, name: str, device: torch.device, settings: dict, path: str | None):
        self.body = {"benchmark": name, **run_info(device), **settings, "results": []}
        self.path = Path(path) if path else None
        self.save()

    def add(self, row: dict) -> None:
        self.body["results"].append(row)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.body, indent=1) + "\n")
            tmp.replace(self.path)

    def print(self) -> None:
        print(json.dumps(self.body))
