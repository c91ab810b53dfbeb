"""The weight average: its decay warm-up, the swap in and out, and its state round trip."""

import pytest
import torch
from torch import nn

from clipgen.train.ema import WeightAverage


def test_the_average_follows_the_weights_with_a_warming_decay():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): early updates move it a lot
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start + 0.9)  # weight 1 - 0.1
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9 and torch.allclose(ema.shadow["weight"], model.weight, atol=1e-6)


def test_averaged_swaps_the_weights_in_and_back_out():
    model = nn.Linear(3, 2)
    ema = WeightAverage(model, decay=0.99)
    own = model.weight.detach().clone()
    ema.shadow["weight"].fill_(7.0)
    with ema.averaged(model):
        assert (model.weight == 7.0).all()
    assert torch.equal(model.weight, own)
    with pytest.raises(RuntimeError), ema.averaged(model):  # put back even when the block fails
        raise RuntimeError("boom")
    assert torch.equal(model.weight, own)


def test_state_round_trips_with_its_update_count():
    model = nn.Linear(3, 2)
    ema = WeightAverage(model, decay=0.99)
    for _ in range(5):
        ema.update(model)
    again = WeightAverage(nn.Linear(3, 2), decay=0.99)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 5 and all(torch.equal(again.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)
