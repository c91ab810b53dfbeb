"""The sampling sweep's choice rule: the closest distribution among the settings that hold the accuracy floor."""

from clipgen.sweep import ACCURACY_FLOOR, choose_setting, distance, holds_floor


def row(name: str, fd: float, fd_judge: float, seen=0.97, held_out=0.9, size=0.9, background=0.9) -> dict:
    return {"name": name, "fd_over_floor": fd, "fd_judge_over_floor": fd_judge, "seen": seen, "held_out": held_out,
            "size": size, "background": background}


def test_the_closest_distribution_wins_among_settings_that_hold_the_floor():
    rows = [row("sharp but collapsed", 5.0, 4.0, seen=0.99, held_out=0.99),  # the old rule's favourite
            row("close, accurate", 1.8, 1.6),
            row("closest, but held-out combinations fail", 1.2, 1.1, held_out=0.7),
            row("close in CLIP space only", 1.0, 3.0)]
    assert choose_setting(rows)["name"] == "close, accurate"
    assert distance(rows[1]) == (1.8 + 1.6) / 2


def test_every_floor_counts_and_a_missing_figure_fails_it():
    assert holds_floor(row("ok", 1, 1))
    for key in ACCURACY_FLOOR:
        assert not holds_floor(row("low", 1, 1) | {key: ACCURACY_FLOOR[key] - 0.01}), key
        assert not holds_floor(row("missing", 1, 1) | {key: None}), key
    assert choose_setting([row("all fail", 1, 1, seen=0.5)]) is None
