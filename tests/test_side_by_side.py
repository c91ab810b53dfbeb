"""The independent chains between the shards and the transformer run side by side, each in a process of its own."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import TINY_RUN

from clipgen.config import load_config
from clipgen.pipeline import STEPS, STEPS_BY_NAME, parse_stages, plan, run_step
from clipgen.side_by_side import SIDE_BY_SIDE, Chain, CoreTurns, core_groups, plan_phases, run_side_by_side


def tiny(tmp_path, *overrides):
    return load_config("pipelines/shapes.yaml", [*TINY_RUN, f"run_dir={tmp_path}", *overrides])


def test_the_chains_need_nothing_from_one_another():
    grouped = [n for chain in SIDE_BY_SIDE for n in chain]
    order = [s.name for s in STEPS]
    first = min(order.index(n) for n in grouped)
    for chain in SIDE_BY_SIDE:
        for i, name in enumerate(chain):
            for needed in STEPS_BY_NAME[name].inputs:  # made before the phase, or earlier in the same chain
                assert needed in chain[:i] or (needed not in grouped and order.index(needed) < first), (name, needed)
    # no other step stands between the grouped ones, so the phase can take their place in the order
    assert set(order[first:first + len(grouped)]) == set(grouped)


def test_a_cold_cpu_run_puts_the_three_chains_in_one_phase(tmp_path, monkeypatch):
    monkeypatch.setattr("clipgen.side_by_side.usable_cores", lambda: 2)
    labels = [[c.label for c in phase] for phase in plan_phases(tiny(tmp_path), parse_stages(None))]
    assert labels == [["shards"], ["vqgan -> tokens", "toyclip -> embeddings", "judge"], ["gpt"], ["samples"],
                      ["report"]]
    serial = [[c.label for c in phase] for phase in
              plan_phases(tiny(tmp_path, "orchestration.side_by_side=false"), parse_stages(None))]
    assert serial == [["shards -> judge"], ["toyclip"], ["embeddings"], ["vqgan"], ["tokens"], ["gpt"], ["samples"],
                      ["report"]]
    on_dask = plan_phases(tiny(tmp_path, "orchestration.task_runner=dask"), parse_stages(None))
    assert [[c.label for c in phase] for phase in on_dask] == serial  # the cluster keeps the shard fan-out
    monkeypatch.setattr("clipgen.side_by_side.usable_cores", lambda: 1)  # one core: nothing to share out
    assert all(len(phase) == 1 for phase in plan_phases(tiny(tmp_path), parse_stages(None)))


def test_one_chain_with_work_runs_here(tiny_run, monkeypatch):
    monkeypatch.setattr("clipgen.side_by_side.usable_cores", lambda: 2)
    # everything up to the transformer is built: nothing runs side by side
    assert all(len(phase) == 1 for phase in plan_phases(tiny_run, parse_stages(None)))
    # only the tokenizer chain and the shards are asked for: one chain, so no process is started
    assert all(len(phase) == 1 for phase in plan_phases(tiny_run, parse_stages("ingest,train-vqgan,tokenize")))


def test_core_groups_split_the_cores_evenly():
    assert core_groups(2, [0, 1]) == [[0], [1]]
    assert core_groups(2, [0, 1, 2, 3, 4]) == [[0, 1, 2], [3, 4]]
    assert core_groups(3, [4, 5, 6, 7]) == [[4, 5], [6], [7]]


def test_side_by_side_builds_what_the_plan_names_and_a_failed_chain_keeps_the_others_work(tmp_path):
    cfg = tiny(tmp_path / "run")
    run_step(cfg, "shards")
    chains = [Chain(c) for c in SIDE_BY_SIDE]
    results = run_side_by_side(cfg, chains)
    artifacts = plan(cfg)
    assert sorted(results) == sorted(n for c in SIDE_BY_SIDE for n in c)
    for name, result in results.items():
        assert result["id"] == artifacts[name].id and not result["cached"] and artifacts[name].is_complete()
    assert all(r["cached"] for r in run_side_by_side(cfg, chains).values())  # a rerun only reports

    # no shards: the CLIP chain fails in its process, and the judge, which needs none, is still built
    broken = tiny(tmp_path / "broken")
    with pytest.raises(RuntimeError, match="toyclip -> embeddings failed in its own process"):
        run_side_by_side(broken, [Chain(("toyclip", "embeddings")), Chain(("judge",))])
    assert plan(broken)["judge"].is_complete() and not plan(broken)["toyclip"].is_complete()


def test_cores_go_to_the_chains_in_turn_whichever_thread_asks_first():
    turns, got = CoreTurns([[0], [1]]), {}

    def take(turn):
        got[turn] = turns.take(turn)

    asking = [threading.Thread(target=take, args=(turn,)) for turn in (2, 1)]  # the later turns ask first
    for thread in asking:
        thread.start()
    time.sleep(0.2)  # room for them to jump the queue, were there no turns (not a timing assertion)
    assert got == {}
    take(0)
    asking[1].join(10)
    assert got == {0: [0], 1: [1]} and asking[0].is_alive()  # the third waits for a group to come back
    turns.give_back(got[1])
    asking[0].join(10)
    assert got[2] == [1]
