"""A rerun with nothing to build: ``clipgen run`` (which starts no Prefect when every step is built) against the
same run through the Prefect flow, alternated in one session on one finished run.

    python benchmarks/noop_rerun.py --pipeline pipelines/shapes.yaml --repeats 3 \
        --out benchmarks/results/noop_rerun_cpu.json

Both paths load the config, check the inputs and print the same table; the flow path also starts Prefect's
temporary server and runs every stage flow, each of which finds its steps cached. The run must be finished
(``make demo`` first); the benchmark refuses a run with anything left to build, which it would time instead.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from run_info import ROOT, Report

from clipgen.config import load_config
from clipgen.pipeline import STAGES, cached_results

THROUGH_FLOW = """
from clipgen.cli import print_results, run_flow
from clipgen.config import load_config
from clipgen.pipeline import parse_stages
from clipgen.preflight import check_inputs
cfg = load_config({pipeline!r}, [])
check_inputs(cfg, parse_stages(None))
print_results(cfg, run_flow({pipeline!r}, [], None))
"""


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pipelines/shapes.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the report here (JSON)")
    args = parser.parse_args()
    if cached_results(load_config(args.pipeline, []), STAGES) is None:
        sys.exit(f"{args.pipeline}: some step is not built; run it first (make demo), then time the rerun")
    paths = {"clipgen run": [sys.executable, "-m", "clipgen.cli", "run", args.pipeline],
             "through the Prefect flow": [sys.executable, "-c", THROUGH_FLOW.format(pipeline=args.pipeline)]}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # alternated, so a busy moment of the machine hits both
        for name, command in paths.items():
            seconds[name].append(round(timed(command), 2))
    report = Report("noop_rerun", torch.device("cpu"), {"pipeline": args.pipeline, "repeats": args.repeats}, args.out)
    for name, times in seconds.items():
        report.add({"path": name, "seconds": times, "median_s": statistics.median(times)})
    medians = [row["median_s"] for row in report.body["results"]]
    report.body["speedup"] = round(medians[1] / medians[0], 2)
    report.save()
    report.print()


if __name__ == "__main__":
    main()
