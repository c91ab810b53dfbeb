"""Benchmark: CPU training steps with glibc keeping freed memory (:mod:`clipgen.host_memory`, what a pipeline
step sets) against glibc's defaults (``CLIPGEN_MALLOC=default``).

Each round runs ``train_gpt.py`` (the shapes transformer, fp32) and ``train_vqgan.py`` (the shapes tokenizer,
fp32) once in each setting, one process at a time, the setting that goes first alternating from round to
round, so that a machine whose speed drifts favours neither. Reports, per workload and setting, the median
over rounds of the training loop's own step time (its second half) and the children's system CPU seconds and
minor page faults, which is where the difference comes from. Prints one JSON line; ``--out`` also writes it.

    python benchmarks/host_memory.py [--rounds 4] [--workloads gpt,vqgan] [--out benchmarks/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from run_info import run_info  # beside this script

from clipgen.host_memory import OPT_OUT_ENV

HERE = Path(__file__).resolve().parent
SETTINGS = ("kept", "default")


def workload_command(name: str, steps: int) -> list[str]:
    if name == "gpt":
        return [sys.executable, str(HERE / "train_gpt.py"), "--presets", "tiny", "--precisions", "fp32",
                "--steps", str(steps)]
    if name == "vqgan":
        return [sys.executable, str(HERE / "train_vqgan.py"), "--precisions", "fp32", "--steps", str(steps * 4)]
    raise SystemExit(f"unknown workload {name!r}; choose from gpt, vqgan")


def step_ms(name: str, result: dict) -> float:
    if name == "gpt":
        return result["results"][0]["step_ms"]
    row = result["results"][0]
    return 1000 * result["vqgan"]["batch_size"] / row["images_per_s"]


def run_once(name: str, setting: str, steps: int) -> dict:
    """One child process of ``name`` in ``setting``: its step time, system seconds and minor page faults."""
    env = {**os.environ, OPT_OUT_ENV: "default" if setting == "default" else ""}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(workload_command(name, steps), env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{name} ({setting}) failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    kept = result.get("kept_freed_memory")
    if kept != (setting == "kept"):
        raise SystemExit(f"{name} ({setting}) ran with kept_freed_memory={kept}: is this host glibc Linux?")
    return {"step_ms": step_ms(name, result), "system_s": after.ru_stime - before.ru_stime,
            "user_s": after.ru_utime - before.ru_utime, "minor_faults": after.ru_minflt - before.ru_minflt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="transformer steps a run (the tokenizer runs 4x)")
    parser.add_argument("--workloads", default="gpt,vqgan")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs: dict[str, dict[str, list[dict]]] = {}
    for r in range(args.rounds):
        order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
        for name in args.workloads.split(","):
            for setting in order:
                runs.setdefault(name, {}).setdefault(setting, []).append(run_once(name, setting, args.steps))
    results = []
    for name, by_setting in runs.items():
        row = {"workload": name}
        for setting, rows in by_setting.items():
            row[setting] = {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
            row[setting]["step_ms_each_round"] = [round(r["step_ms"], 1) for r in rows]
        row["default_over_kept_step_time"] = round(row["default"]["step_ms"] / row["kept"]["step_ms"], 3)
        results.append(row)
    body = {"benchmark": "host_memory", **run_info(torch.device("cpu")), "rounds": args.rounds,
            "steps": args.steps, "results": results}
    line = json.dumps(body)
    if args.out:
        Path(args.out).write_text(json.dumps(body, indent=1) + "\n")
    print(line)


if __name__ == "__main__":
    main()
