"""The ``clipgen`` command line.

``clipgen run`` drives the Prefect ``clip-gen`` flow; it imports ``flows`` only inside that command so
the library itself never imports Prefect. Every other command is plain library code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from clipgen.config import ConfigError, PipelineConfig, load_config

EPILOG = """examples:
  clipgen run pipelines/shapes.yaml                      # the whole embedded default pipeline
  clipgen run pipelines/shapes.yaml --stages ingest      # one stage (cached stages are skipped)
  clipgen run pipelines/shapes.yaml --set gpt.n_layer=6  # an ablation: only downstream stages rerun
  clipgen status runs/shapes                             # stage ids and what is cached
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key with a dotted path, e.g. --set gpt.n_layer=4 (repeatable)")


def _load_from(target: str, overrides: list[str]) -> PipelineConfig:
    """A pipeline YAML, or a run folder holding the pipeline.yaml that ``clipgen run`` saved there."""
    path = Path(target)
    if path.is_dir():
        saved = path / "pipeline.yaml"
        if not saved.is_file():
            raise ConfigError(f"{path} is not a run folder (no pipeline.yaml); pass a run folder "
                              f"such as runs/shapes or a pipeline file such as pipelines/shapes.yaml")
        return load_config(saved, [*overrides, f"run_dir={path}"])
    return load_config(path, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from clipgen.pipeline import parse_stages

    cfg = load_config(args.pipeline, args.overrides)  # fail on bad config before Prefect starts
    parse_stages(args.stages)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "clipgen")
    if os.environ.get("PREFECT_HOME"):  # Prefect's local database cannot be created in a missing folder
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    from flows.pipeline import clip_gen  # Prefect is imported here, never by the library

    results = clip_gen(pipeline=str(args.pipeline), overrides=args.overrides, stages=args.stages)
    print(f"\nrun folder: {cfg.run_path.resolve()}")
    for stage, steps in results.items():
        for name, res in steps.items():
            state = "cached" if res["skipped"] else "built"
            print(f"  {stage:<14} {name:<10} {state:<7} {res['path']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from clipgen.pipeline import STEPS_BY_NAME, plan

    cfg = _load_from(args.target, args.overrides)
    print(f"run folder: {cfg.run_path}")
    for name, art in plan(cfg).items():
        state = "cached" if art.is_complete() else "missing"
        print(f"  {STEPS_BY_NAME[name].stage:<14} {name:<10} {art.id}  {state:<7} {art.path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    cfg = _load_from(args.target, args.overrides)
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from clipgen.judge import judge_accuracy, load_judge
    from clipgen.pipeline import plan

    cfg = _load_from(args.run, args.overrides)
    artifacts = plan(cfg)
    if "judge" not in artifacts:
        raise ConfigError("this pipeline has no judge: it exists only for data.source: world")
    for name in ("shards", "judge"):
        if not artifacts[name].is_complete():
            raise FileNotFoundError(f"{name} not built at {artifacts[name].path}; run: clipgen run PIPELINE --stages ingest")
    acc = judge_accuracy(load_judge(artifacts["judge"].path), artifacts["shards"].path, split=args.split)
    print(json.dumps(acc, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipgen", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train a text-to-image generator from unlabeled images, the CLIP-GEN way: "
                    "CLIP embeds images, a VQGAN tokenizes them, a transformer learns codes from embeddings.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run pipeline stages through the Prefect clip-gen flow",
                       description="Run a pipeline through the Prefect 'clip-gen' flow (ephemeral mode: no server "
                                   "needed). Finished stages are skipped; a changed config reruns what it affects.")
    p.add_argument("pipeline", type=Path, help="pipeline YAML, e.g. pipelines/shapes.yaml")
    p.add_argument("--stages", help="comma-separated stages to run, in pipeline order (default: all)")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="list each step's id and whether it is cached",
                       description="Show every step of a pipeline with its content-addressed id and state.")
    p.add_argument("target", help="a run folder (runs/shapes) or a pipeline YAML")
    _add_config_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("config", help="print the fully resolved config (presets and overrides applied)",
                       description="Validate a pipeline and print every key with its resolved value.")
    p.add_argument("target", help="a pipeline YAML or a run folder")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("judge", help="print the shapes-world judge's accuracy per attribute",
                       description="Score the trained attribute judge on held-out world images.")
    p.add_argument("--run", required=True, help="a run folder (runs/shapes) or a pipeline YAML")
    p.add_argument("--split", default="heldout", help="which shard split to score (default: heldout)")
    _add_config_args(p)
    p.set_defaults(func=cmd_judge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipgen").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"clipgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
