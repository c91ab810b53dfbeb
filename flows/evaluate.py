"""The ``evaluate`` stage flow (see clipgen.stages.evaluate_stage): builds the report, points
``report/latest`` at it and publishes its key numbers as Prefect artifacts (a table and a markdown link)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from clipgen.report import link_latest, metric_rows
from flows.common import load, run_stage


@flow(name="evaluate")
def evaluate(pipeline: str, overrides: list[str] | None = None, steps: list[str] | None = None) -> dict[str, dict]:
    results = run_stage(load(pipeline, overrides), "evaluate", steps)
    report = Path(results["report"]["path"])
    link_latest(report)
    metrics = json.loads((report / "metrics.json").read_text())
    create_table_artifact(metric_rows(metrics), key="clipgen-metrics",
                          description=f"{metrics['run']}: samples and anchor rows ({metrics['feature_space']})")
    headline = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics["headline"].items() if v is not None)
    create_markdown_artifact(f"[Evaluation report]({(report / 'index.html').resolve().as_uri()})\n\n"
                             f"| metric | value |\n|---|---|\n{headline}\n", key="clipgen-report",
                             description=f"{metrics['run']} report {report.name}")
    return results
