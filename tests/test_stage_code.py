"""A step's code cannot change under a cached artifact unnoticed: see tests/stage_code.py for the rule."""

from __future__ import annotations

import json

import pytest
from stage_code import RECORD, closure, current, normalised

from clipgen.pipeline import STEPS

SOURCE = '''"""Module docstring."""
SCALE = 2  # a comment


def f(x):
    """Docstring."""
    return x * SCALE
'''


@pytest.mark.parametrize("step", [s.name for s in STEPS])
def test_a_steps_code_does_not_change_without_a_decision_about_its_version(step):
    recorded = json.loads(RECORD.read_text()).get(step)
    now = current()[step]
    assert recorded is not None, f"step {step!r} is not recorded: run python tests/stage_code.py"
    if now["digest"] != recorded["digest"]:
        assert now["code_version"] != recorded["code_version"], (
            f"the code that step {step!r} runs changed, and its code_version is still {now['code_version']!r}. "
            "If its output can change, bump code_version in clipgen/pipeline.py; either way, then record the "
            "new digest with: python tests/stage_code.py")
        pytest.fail(f"step {step!r}: code_version bumped; record its digest with: python tests/stage_code.py")
    assert now["code_version"] == recorded["code_version"], f"step {step!r}: record its new version"


def test_comments_and_docstrings_do_not_count_and_code_does():
    base = normalised(SOURCE)
    assert normalised(SOURCE.replace("a comment", "another comment").replace("Docstring.", "Says more.")) == base
    assert normalised(SOURCE.replace('"""Module docstring."""\n', "")) == base
    assert normalised(SOURCE.replace("SCALE = 2", "SCALE = 3")) != base
    assert normalised(SOURCE.replace("x * SCALE", "SCALE * x")) != base


def test_a_steps_modules_are_found_through_function_level_imports():
    modules = closure("clipgen.stages.gpt_stage")
    assert {"clipgen.train.gpt_trainer", "clipgen.models.gpt", "clipgen.stages"} <= set(modules)
    assert "clipgen.config" not in modules and "clipgen.cli" not in modules
