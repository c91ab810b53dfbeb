"""The ``clipgen`` command line.

``clipgen run`` drives the Prefect ``clip-gen`` flow; it imports ``flows`` only inside that command so
the library itself never imports Prefect. Every other command is plain library code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from clipgen.config import ConfigError, PipelineConfig, config_yaml, load_config
from clipgen.errors import ClipgenError
from clipgen.report import HEADLINE_LABELS
from clipgen.validate import validate_sample

EPILOG = """examples:
  clipgen run pipelines/shapes.yaml                      # the whole embedded default pipeline
  clipgen run pipelines/shapes.yaml --stages ingest      # one stage (cached stages are skipped)
  clipgen run pipelines/shapes.yaml --set gpt.n_layer=6  # an ablation: only downstream stages rerun
  clipgen status runs/shapes                             # stage ids and what is cached
  clipgen evaluate --run runs/shapes                     # (re)build only the evaluation report
  clipgen generate --run runs/shapes "a red circle" "a green triangle" -n 8 --out samples/
"""


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key with a dotted path, e.g. --set gpt.n_layer=4 (repeatable)")
    p.add_argument("--debug", action="store_true", help="on an error, show its traceback, not just its message")


def resolve_target(target: str, overrides: list[str]) -> tuple[Path, list[str]]:
    """(pipeline file, overrides) for a pipeline YAML, or for a run folder holding the pipeline.yaml that
    ``clipgen run`` saved there (its folder becomes ``run_dir``)."""
    path = Path(target)
    if not path.exists():
        raise ConfigError(f"{path} does not exist: pass a run folder such as runs/shapes (made by clipgen run) "
                          "or a pipeline file such as pipelines/shapes.yaml")
    if path.is_dir():
        saved = path / "pipeline.yaml"
        if not saved.is_file():
            raise ConfigError(f"{path} is not a run folder (no pipeline.yaml); pass a run folder "
                              f"such as runs/shapes or a pipeline file such as pipelines/shapes.yaml")
        return saved, [*overrides, f"run_dir={path}"]
    return path, list(overrides)


def load_run_config(target: str, overrides: list[str]) -> PipelineConfig:
    return load_config(*resolve_target(target, overrides))


# Set for Prefect unless the user set them: no telemetry (nothing outside is reached), and time for the
# ephemeral server to start on a busy 2-core machine (Prefect's 20 s default fails there).
PREFECT_DEFAULTS = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_LOGGING_EXTRA_LOGGERS": "clipgen"}


def set_prefect_defaults(environ=os.environ) -> None:
    for name, value in PREFECT_DEFAULTS.items():
        environ.setdefault(name, value)


def run_flow(pipeline: str, overrides: list[str], stages: str | None) -> dict[str, dict]:
    """Run ``stages`` through the Prefect ``clip-gen`` flow (ephemeral mode unless PREFECT_API_URL is set)."""
    set_prefect_defaults()
    if os.environ.get("PREFECT_HOME"):  # Prefect's local database cannot be created in a missing folder
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    from flows.pipeline import clip_gen  # Prefect is imported here, never by the library

    return clip_gen(pipeline=pipeline, overrides=overrides, stages=stages)


def print_results(cfg: PipelineConfig, results: dict[str, dict]) -> None:
    print(f"\nrun folder: {cfg.run_path.resolve()}")
    for stage, steps in results.items():
        for name, res in steps.items():
            state = "cached" if res["cached"] else "built"
            print(f"  {stage:<14} {name:<10} {state:<7} {res['path']}")
    report = results.get("evaluate", {}).get("report")
    if report:
        print(f"\nreport: {Path(report['path']).resolve() / 'index.html'}")
        for key, label in HEADLINE_LABELS.items():
            if (value := report["headline"].get(key)) is not None:
                print(f"  {label:<42} {value:.4g}")


def run_stages(cfg: PipelineConfig, pipeline: str, overrides: list[str], stages: str | None) -> dict[str, dict]:
    """Run ``stages`` (their inputs checked by the caller) through the flow. When every step is already built
    the flow would only report "cached", so Prefect (its temporary server alone takes 10-20 s) is not started."""
    from clipgen.pipeline import cached_results, parse_stages, save_run_config

    results = cached_results(cfg, parse_stages(stages))
    if results is None:
        return run_flow(pipeline, overrides, stages)
    save_run_config(cfg)  # as the flow does: runtime-only overrides change the saved config, not the ids
    logging.getLogger("clipgen").info("every step asked for is built: nothing to run, Prefect not started")
    return results


def cmd_run(args: argparse.Namespace) -> int:
    from clipgen.pipeline import parse_stages
    from clipgen.preflight import check_inputs

    cfg = load_config(args.pipeline, args.overrides)  # fail on bad config before Prefect starts
    check_inputs(cfg, parse_stages(args.stages))
    print_results(cfg, run_stages(cfg, str(args.pipeline), args.overrides, args.stages))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from clipgen.pipeline import plan
    from clipgen.preflight import check_inputs

    pipeline, overrides = resolve_target(args.run, args.overrides)
    cfg = load_config(pipeline, overrides)
    check_inputs(cfg, ["evaluate"])
    report = plan(cfg)["report"]
    if args.force and report.path.exists():
        shutil.rmtree(report.path)  # rebuilt below; every input artifact stays as it is
    print_results(cfg, run_stages(cfg, str(pipeline), overrides, "evaluate"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from clipgen.pipeline import STEPS_BY_NAME, plan

    cfg = load_run_config(args.target, args.overrides)
    print(f"run folder: {cfg.run_path}")
    artifacts = plan(cfg)
    for name, art in artifacts.items():
        state = "cached" if art.is_complete() else "missing"
        reads = ", ".join(n for n in STEPS_BY_NAME[name].inputs if n in artifacts) or "-"
        print(f"  {STEPS_BY_NAME[name].stage:<14} {name:<10} {art.id}  {state:<7} reads {reads:<46} {art.path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.target, args.overrides)
    print(config_yaml(cfg), end="")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from clipgen.judge import judge_accuracy, load_judge
    from clipgen.pipeline import plan

    cfg = load_run_config(args.run, args.overrides)
    artifacts = plan(cfg)
    if "judge" not in artifacts:
        raise ConfigError("this pipeline has no judge: it exists only for data.source: world")
    for name in ("shards", "judge"):
        if not artifacts[name].is_complete():
            raise FileNotFoundError(f"{name} not built at {artifacts[name].path}; run: clipgen run PIPELINE --stages ingest")
    acc = judge_accuracy(load_judge(artifacts["judge"].path), artifacts["shards"].path, split=args.split)
    print(json.dumps(acc, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from clipgen.generate import check_prompts, generate, judged_per_prompt, write_outputs
    from clipgen.pipeline import plan
    from clipgen.stages.generate_stage import load_generator

    prompts = check_prompts(args.prompts)  # a bad prompt fails before any model loads
    cfg = load_run_config(args.run, args.overrides)
    knobs = {"n_per_prompt": args.n, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "cfg_scale": args.cfg_scale, "bridge": args.bridge, "rerank_candidates": args.rerank,
             "rerank_against": args.rerank_against, "rerank_prompt_weight": args.rerank_prompt_weight,
             "rerank_prompt_margin": args.rerank_prompt_margin,
             "seed": args.seed}
    given = {k: v for k, v in knobs.items() if v is not None}
    settings = dataclasses.replace(cfg.sample, **given)
    flags = {"n_per_prompt": "-n", "rerank_candidates": "--rerank"}  # the others: --field-name
    validate_sample(settings, lambda k: flags.get(k, "--" + k.replace("_", "-")) if k in given else f"sample.{k}")
    result = generate(load_generator(cfg, plan(cfg)), prompts, settings)
    table = write_outputs(result, args.out)
    print(f"{len(result.images)} images and {table.name} in {args.out}")
    judged = judged_per_prompt(result) if result.verdict is not None else {}
    for prompt in prompts:
        rows = [i for i, p in enumerate(result.prompts) if p == prompt]
        line = f"  {prompt!r}: CLIP score {result.clip_scores[rows].mean():.1f}"
        named = {k: v for k, v in judged.get(prompt, {}).items() if k != "both" and v is not None}
        if named:
            line += ", judge agrees on " + ", ".join(f"{k} {round(v * len(rows))}/{len(rows)}" for k, v in named.items())
        print(line)
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
    _add_common_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate", help="run only the evaluate stage on a finished run and print the report",
                       description="Build the evaluation report of a run whose other stages are finished.")
    p.add_argument("--run", required=True, help="a run folder (runs/shapes) or a pipeline YAML")
    p.add_argument("--force", action="store_true", help="rebuild the report even if this config's is cached")
    _add_common_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("status", help="list each step's id and whether it is cached",
                       description="Show every step of a pipeline with its content-addressed id and state.")
    p.add_argument("target", help="a run folder (runs/shapes) or a pipeline YAML")
    _add_common_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("config", help="print the fully resolved config (presets and overrides applied)",
                       description="Validate a pipeline and print every key with its resolved value.")
    p.add_argument("target", help="a pipeline YAML or a run folder")
    _add_common_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("judge", help="print the shapes-world judge's accuracy per attribute",
                       description="Score the trained attribute judge on held-out world images.")
    p.add_argument("--run", required=True, help="a run folder (runs/shapes) or a pipeline YAML")
    p.add_argument("--split", default="heldout", help="which shard split to score (default: heldout)")
    _add_common_args(p)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("generate", help="draw images for text prompts from a finished run",
                       description="Generate images from text prompts with a finished run's models. Options "
                                   "left out take the run's sample.* config.")
    p.add_argument("prompts", nargs="+", help='one or more prompts, e.g. "a red circle"')
    p.add_argument("--run", required=True, help="a run folder (runs/shapes) or a pipeline YAML")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs and samples.csv")
    p.add_argument("-n", type=int, help="images per prompt")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int, help="0 = off")
    p.add_argument("--top-p", type=float, help="1.0 = off")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1.0 = off)")
    p.add_argument("--bridge", choices=["none", "noise", "knn"], help="text-to-image embedding bridge")
    p.add_argument("--rerank", type=int, help="candidates drawn per image, the CLIP-best kept (0 = off)")
    p.add_argument("--rerank-against", choices=["prompt", "condition", "both", "prompt_then_condition"],
                   help="re-rank by CLIP similarity to the prompt, to each draw's bridged condition, to both, or to "
                        "the condition among the candidates near the best match to the prompt")
    p.add_argument("--rerank-prompt-weight", type=float,
                   help="with --rerank-against both: the prompt's weight beside the condition's 1")
    p.add_argument("--rerank-prompt-margin", type=float,
                   help="with --rerank-against prompt_then_condition: the cosine margin below the best match to the "
                        "prompt within which candidates compete on the condition")
    p.add_argument("--seed", type=int)
    _add_common_args(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipgen").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ClipgenError, FileNotFoundError) as exc:  # the project's own errors say what to fix
        if args.debug:
            raise
        print(f"clipgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
