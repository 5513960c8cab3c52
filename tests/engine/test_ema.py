"""The weights' exponential moving average (cssfe/engine/ema.py) against its definition."""
import torch
import torch.nn as nn

from cssfe.engine.ema import ModelEMA


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)


def test_ema_moves_a_decay_fraction_towards_the_model():
    """ema <- decay * ema + (1 - decay) * model, per tensor. Wrong implementations this fails:
    decay and 1 - decay swapped (the EMA would jump 90 % of the way), an EMA that shares the
    model's tensors (moves before update), or one that skips the buffers (BatchNorm statistics)."""
    model, decay = _model(), 0.9
    ema = ModelEMA(model, decay)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked += 5
    assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in start.items())  # a copy, not the model
    ema.update(model)
    for key, now in model.state_dict().items():
        got = ema.module.state_dict()[key]
        if now.dtype.is_floating_point:
            torch.testing.assert_close(got, decay * start[key] + (1 - decay) * now, msg=key)
        else:  # integer counters are copied, not averaged
            assert torch.equal(got, now), key
    ema.update(model)  # a second step moves (1 - decay) of the remaining distance again
    w = ema.module[0].weight
    torch.testing.assert_close(w, decay ** 2 * start["0.weight"] + (1 - decay ** 2) * model[0].weight)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_ema_of_a_bf16_model_averages_in_fp32():
    """Small steps of a bf16 model (DeepSpeed's) accumulate in the fp32 EMA instead of rounding away:
    an EMA kept in the model's dtype would stay where it started."""
    model = _model()
    ema = ModelEMA(model, 0.999)
    half = _model(torch.bfloat16)
    with torch.no_grad():
        for p in half.parameters():
            p.copy_(torch.ones_like(p))
    start = ema.module[0].weight.clone()
    for _ in range(10):
        ema.update(half)
    assert ema.module[0].weight.dtype == torch.float32
    want = 0.999 ** 10 * start + (1 - 0.999 ** 10) * torch.ones_like(start)
    torch.testing.assert_close(ema.module[0].weight, want)
