"""A short table of what ``benchmarks/gpu.sh`` measured: sampling, training, the GPU tests.

    python benchmarks/summarize.py FOLDER      (reads FOLDER/sample.json, train_gpt.json, test_gpu.log)

Missing or partial files are said so, not fatal: a part that timed out still shows the rows it wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sampling_lines(body: dict) -> list[str]:
    lines = [f"sampling on {body['device']} ({body['commit'][:12]}, {body['date']}); images/s, share of the "
             "roofline bound, fp32 greedy parity with the reference loop",
             f"  {'preset':<7}{'batch':>6}  {'path':<13}{'images/s':>10}{'of bound':>10}{'bound':>9}  parity"]
    for row in body["results"]:
        for batch, images_per_s in (row.get("reference") or {}).items():
            lines.append(f"  {row['preset']:<7}{batch:>6}  {'reference':<13}{images_per_s:>10}")
        for path, result in row["paths"].items():
            parity = {True: "yes", False: "NO"}.get(result.get("greedy_parity"), "-")
            if result.get("greedy_parity") is False and result.get("greedy_matches_plain"):
                parity += " (= plain: a near-tie)"
            if "error" in result:
                lines.append(f"  {row['preset']:<7}{'':>6}  {path:<13}  error: {result['error'][:70]}")
            for batch, entry in result.items():
                if isinstance(entry, dict):
                    bound = row["bounds"].get(batch, {}).get("images_per_s", "-")
                    lines.append(f"  {row['preset']:<7}{batch:>6}  {path:<13}{entry['images_per_s']:>10}"
                                 f"{entry.get('of_bound', '-'):>10}{bound:>9}  {parity}")
        if "graph_attention" in row:
            lines.append(f"  {row['preset']}: sample_tokens_graphed used attention={row['graph_attention']}")
    return lines


def training_lines(body: dict) -> list[str]:
    lines = [f"training on {body['device']} ({body['steps']} steps, MFU over {body['peak_flops']:.3g} FLOP/s)",
             f"  {'preset':<7}{'batch':>6}{'micro':>6}  {'compile':<8}{'tokens/s':>11}{'MFU':>7}{'step ms':>9}"
             f"{'data wait':>10}  flash"]
    for row in body["results"]:
        options = row.get("speed_options", {})
        if "error" in row:
            lines.append(f"  {row['preset']:<7}{row['batch_size']:>6}{'':>6}  {str(options.get('compile')):<8}"
                         f"  error: {row['error'][:70]}")
            continue
        lines.append(f"  {row['preset']:<7}{row['batch_size']:>6}{row['micro_batch']:>6}  "
                     f"{str(options.get('compile')):<8}{row['tokens_per_s']:>11.0f}{row['mfu']:>7.1%}"
                     f"{row['step_ms']:>9}{row['data_wait_fraction']:>10.2%}  {options.get('flash_attention')}")
    return lines


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    lines: list[str] = []
    for name, render in (("sample.json", sampling_lines), ("train_gpt.json", training_lines)):
        body = load(folder / name)
        lines += render(body) if body else [f"{name}: missing or unreadable"]
        lines.append("")
    embed = load(folder / "embed.json")
    if embed:
        lines += [f"embed: {json.dumps(embed.get('results', embed))[:300]}", ""]
    try:
        tail = [line for line in (folder / "test_gpu.log").read_text().splitlines() if line.strip()]
        lines.append(f"tests/test_gpu.py: {tail[-1].strip('= ') if tail else 'no output'}")
    except OSError:
        lines.append("tests/test_gpu.py: no log")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
