"""One torchrun rank of a multi-process step (:mod:`clipgen.train.launch` starts them): build the step into
the given folder; rank 0 records the summary for the parent.

A module of its own because it looks the step up in :mod:`clipgen.pipeline`, which imports the launcher:
keeping the two apart keeps the import graph free of cycles.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from clipgen.artifacts import write_json_atomic
from clipgen.config import load_config
from clipgen.fanout import serial_map
from clipgen.host_memory import keep_freed_memory
from clipgen.pipeline import STEPS_BY_NAME, plan
from clipgen.train.launch import SUMMARY_FILE


def main(argv: list[str]) -> None:
    config_file, step_name, out = argv
    keep_freed_memory()
    cfg = load_config(config_file, [])
    step = STEPS_BY_NAME[step_name]
    artifacts = plan(cfg)
    summary = step.build(cfg, {n: artifacts[n] for n in step.inputs if n in artifacts}, Path(out), serial_map)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(Path(out) / SUMMARY_FILE, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
