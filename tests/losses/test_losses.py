"""Tests for cssfe.losses: every loss against an independent float64 elementwise oracle."""
import math

import pytest
import torch
import torch.nn as nn

from cssfe import ops
from cssfe.losses import (
    LOSSES,
    AsymmetricLoss,
    ClassBalancedFocalLoss,
    DistributionBalancedLoss,
    FusedAsymmetricLoss,
    build_loss,
)

NAMES = ["asl", "bce", "focal", "db", "db_focal", "cb_focal", "pg"]
B, C = 7, 13
N_TRAIN = 1500


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def long_tailed_freq(seed, num_classes=C, head=700, tail=3):
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(num_classes, dtype=torch.float64)
    freq = torch.round(head * (tail / head) ** (k / (num_classes - 1))).long()
    return freq[torch.randperm(num_classes, generator=g)].tolist()


def make_batch(seed, dtype=torch.float64, b=B, c=C):
    """Random logits (some at |z| = 30), 0/1 targets with >= 1 positive per row, several in some rows."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=torch.float64) * 4
    big = torch.rand(b, c, generator=g) < 0.3
    sign = torch.where(torch.rand(b, c, generator=g) < 0.5, -1.0, 1.0).double()
    z = torch.where(big, sign * 30.0, z)
    y = torch.rand(b, c, generator=g) < 0.3
    y[torch.arange(b), torch.randint(c, (b,), generator=g)] = True
    y[0, :4] = True
    y[1, -3:] = True
    z[0, 0], z[1, 1] = -30.0, 30.0  # a very wrong positive and a very confident one, if labels allow
    return z.to(dtype).requires_grad_(), y


# --------------------------------------------------------------------------------------------------
# float64 oracles: plain elementwise math, independent of the implementation
# --------------------------------------------------------------------------------------------------
def softplus(x):  # log(1 + e^x)
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-x.abs()))


def log_sigmoid(x):
    return -softplus(-x)


def sigmoid(x):
    return torch.exp(log_sigmoid(x))


def bce_oracle(z, y):
    y = y.double()
    return (y * softplus(-z) + (1 - y) * softplus(z)).mean()


def focal_oracle(z, y, gamma=2.0, alpha=None):
    y = y.double()
    one_minus_pt = y * sigmoid(-z) + (1 - y) * sigmoid(z)
    ce = y * softplus(-z) + (1 - y) * softplus(z)
    loss = one_minus_pt ** gamma * ce
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss.mean()


def asl_oracle(z, y, gamma_neg=4, gamma_pos=0, clip=0.05, eps=1e-8, detach_w=True):
    y = y.double()
    p = 1 / (1 + torch.exp(-z))
    p_m = torch.minimum(1 - p + clip, torch.ones_like(p)) if clip > 0 else 1 - p
    w_pos = (1 - p) ** gamma_pos
    w_neg = (1 - p_m) ** gamma_neg
    if detach_w:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    lp = torch.log(torch.maximum(p, torch.full_like(p, eps)))
    lm = torch.log(torch.maximum(p_m, torch.full_like(p, eps)))
    return -(y * w_pos * lp + (1 - y) * w_neg * lm).sum()


def db_oracle(z, y, freq, n_train, focal, gamma=2.0, balance=2.0, alpha=0.1, beta=10.0, mu=0.3,
              lam=5.0, kappa=0.05):
    """Wu et al. 2020: r_ik = (1/n_k) / sum_{j in y_i} 1/n_j, r^ = sigmoid(beta (r - mu)) + alpha;
    nu_k = kappa * log(n_k / (N - n_k)); positive r^ log(1 + e^{-(z + nu/lam)}),
    negative r^/lam log(1 + e^{lam z + nu})."""
    y = y.double()
    n = torch.tensor(freq, dtype=torch.float64)
    inv = 1 / n
    r = inv / (y * inv).sum(dim=1, keepdim=True)
    r_hat = sigmoid(beta * (r - mu)) + alpha
    nu = kappa * torch.log(n / (n_train - n))
    z_pos = z + nu / lam
    z_neg = lam * z + nu
    l_pos = r_hat * softplus(-z_pos)
    l_neg = r_hat / lam * softplus(z_neg)
    if focal:
        l_pos = balance * sigmoid(-z_pos) ** gamma * l_pos
        l_neg = balance * sigmoid(z_neg) ** gamma * l_neg
    return (y * l_pos + (1 - y) * l_neg).mean()


def cb_weights_loop(y, freq, beta, mode):
    """Per-sample CB weight with Python floats (w_k = (1 - beta) / (1 - beta^n_k))."""
    cb = lambda n: (1 - beta) / (1 - beta ** n)
    rows = []
    for i in range(y.shape[0]):
        pos = [freq[k] for k in range(y.shape[1]) if y[i, k]]
        if mode == "by_class":
            rows.append([cb(n) for n in freq])
            continue
        if not pos:
            w = 1 - beta
        elif mode == "average_w":
            w = sum(cb(n) for n in pos) / len(pos)
        elif mode == "average_n":
            w = cb(sum(pos) / len(pos))
        else:  # min_n
            w = cb(min(pos))
        rows.append([w] * y.shape[1])
    return torch.tensor(rows, dtype=torch.float64)


def cb_oracle(z, y, freq, beta=0.9, mode="average_w", gamma=2.0, balance=2.0):
    w = cb_weights_loop(y, freq, beta, mode)
    y = y.double()
    one_minus_pt = y * sigmoid(-z) + (1 - y) * sigmoid(z)
    ce = y * softplus(-z) + (1 - y) * softplus(z)
    return (balance * w * one_minus_pt ** gamma * ce).mean()


def pg_oracle(z, y, freq, n_train, tau_pos=1.0, tau_neg=1.0, gamma=2.0, delta=1.0):
    y = y.double()
    n = torch.tensor(freq, dtype=torch.float64)
    b = torch.log(n / (n_train - n))
    zp, zn = z + tau_pos * b, z + tau_neg * b
    p_pos, p_neg = sigmoid(zp), sigmoid(zn)
    q_pos, q_neg = p_pos.detach(), (1 - p_neg).detach()
    n_p, n_n = y.sum(0), (1 - y).sum(0)
    mean_p = (y * q_pos).sum(0) / n_p.clamp(min=1)
    mean_n = ((1 - y) * q_neg).sum(0) / n_n.clamp(min=1)
    gap = (mean_n - mean_p).clamp(0, 1) * ((n_p > 0) & (n_n > 0)).double()
    gamma_neg = gamma * (1 + delta * gap)
    l_pos = -sigmoid(-zp) ** gamma * log_sigmoid(zp)
    l_neg = -p_neg ** gamma_neg * log_sigmoid(-zn)
    return (y * l_pos + (1 - y) * l_neg).mean()


FREQ = long_tailed_freq(0)


def oracle(name, z, y, freq=FREQ, **params):
    if name == "asl":
        return asl_oracle(z, y, **params)
    if name == "bce":
        return bce_oracle(z, y)
    if name == "focal":
        return focal_oracle(z, y, **params)
    if name in ("db", "db_focal"):
        return db_oracle(z, y, freq, N_TRAIN, focal=name == "db_focal", **params)
    if name == "cb_focal":
        return cb_oracle(z, y, freq, **params)
    if name == "pg":
        return pg_oracle(z, y, freq, N_TRAIN, **params)
    raise KeyError(name)


def value_and_grad(fn, z):
    val = fn(z)
    (grad,) = torch.autograd.grad(val, z)
    return val.detach(), grad


# --------------------------------------------------------------------------------------------------
# (1) exact formula, float64
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_matches_oracle_float64(name, seed):
    z, y = make_batch(seed)
    loss = build_loss(name, FREQ, N_TRAIN)
    v, g = value_and_grad(lambda t: loss(t, y), z)
    v_ref, g_ref = value_and_grad(lambda t: oracle(name, t, y), z)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


PARAM_CASES = [
    ("asl", dict(gamma_neg=2, gamma_pos=1, clip=0.1)),
    ("asl", dict(gamma_neg=3, gamma_pos=0, clip=0.0)),
    ("focal", dict(gamma=1.5, alpha=0.25)),
    ("focal", dict(gamma=0.0)),
    ("db", dict(mu=0.2, lam=2.0)),  # COCO-LT setting
    ("db_focal", dict(mu=0.2, lam=2.0, gamma=1.0, balance=1.0)),
    ("cb_focal", dict(beta=0.99, mode="by_class")),
    ("cb_focal", dict(mode="average_n")),
    ("cb_focal", dict(mode="min_n", gamma=0.5)),
    ("pg", dict(tau_pos=0.5, tau_neg=0.2, gamma=1.0, delta=3.0)),
]

# oracle keyword -> build_loss keyword
RENAME = {"mu": "map_gamma", "lam": "neg_scale", "balance": "balance_param"}


def to_build_params(name, params):
    out = {}
    for k, v in params.items():
        k2 = RENAME.get(k, k) if name in ("db", "db_focal", "cb_focal") else k
        out[k2] = v
    return out


@pytest.mark.parametrize("name,params", PARAM_CASES)
def test_matches_oracle_with_params(name, params):
    z, y = make_batch(11)
    loss = build_loss(name, FREQ, N_TRAIN, **to_build_params(name, params))
    v, g = value_and_grad(lambda t: loss(t, y), z)
    v_ref, g_ref = value_and_grad(lambda t: oracle(name, t, y, **params), z)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


# A wrong hyper-parameter must be caught by the oracle comparison (the tests can fail).
MUTATIONS = [
    ("asl", dict(clip=0.1)),
    ("focal", dict(gamma=1.0)),
    ("db", dict(map_gamma=0.2)),
    ("db", dict(init_bias=0.1)),
    ("db_focal", dict(balance_param=1.0)),
    ("cb_focal", dict(beta=0.99)),
    ("cb_focal", dict(mode="by_class")),
    ("pg", dict(delta=0.0)),
    ("pg", dict(tau_neg=0.5)),
]


@pytest.mark.parametrize("name,params", MUTATIONS)
def test_oracle_detects_wrong_parameters(name, params):
    z, y = make_batch(5)
    v, g = value_and_grad(lambda t: build_loss(name, FREQ, N_TRAIN, **params)(t, y), z)
    v_ref, g_ref = value_and_grad(lambda t: oracle(name, t, y), z)
    assert not (torch.allclose(v, v_ref, rtol=1e-6) and torch.allclose(g, g_ref, rtol=1e-6, atol=1e-9))


# --------------------------------------------------------------------------------------------------
# (2) float32 at |logits| <= 30: finite, and close to the float64 oracle
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [4, 5])
@pytest.mark.parametrize("name", NAMES)
def test_float32_large_logits(name, seed):
    z64, y = make_batch(seed)
    z32 = z64.detach().float().requires_grad_()
    loss = build_loss(name, FREQ, N_TRAIN)
    v, g = value_and_grad(lambda t: loss(t, y), z32)
    assert v.dtype == torch.float32 and v.dim() == 0
    assert torch.isfinite(v) and torch.isfinite(g).all()
    v_ref, g_ref = value_and_grad(lambda t: oracle(name, t, y), z64)
    torch.testing.assert_close(v.double(), v_ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-3, atol=2e-5 * g_ref.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_finite(name):
    z = torch.tensor([[30.0, -30.0, 30.0, -30.0, 0.0]] * 3 + [[-30.0, 30.0, 1e-3, -1e-3, 30.0]])
    z.requires_grad_()
    y = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 1, 0, 0], [0, 1, 0, 1, 1], [1, 0, 0, 1, 0]], dtype=torch.bool)
    freq = [3, 700, 40, 9, 250]
    v, g = value_and_grad(lambda t: build_loss(name, freq, N_TRAIN)(t, y), z)
    assert torch.isfinite(v) and torch.isfinite(g).all()


# --------------------------------------------------------------------------------------------------
# (3) ASL against a verbatim copy of the reference
# --------------------------------------------------------------------------------------------------
class ReferenceAsymmetricLoss(nn.Module):
    """Verbatim: Alibaba-MIIL/ASL src/loss_functions/losses.py @ 0a21a18a400934e94fd099fbeeed187bd10433f5,
    except ``torch._C.set_grad_enabled`` -> ``torch.set_grad_enabled`` (same global toggle; the private
    alias no longer exists in this torch)."""

    def __init__(self, gamma_neg=4, gamma_pos=1, clip=0.05, eps=1e-8, disable_torch_grad_focal_loss=True):
        super(ReferenceAsymmetricLoss, self).__init__()

        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.disable_torch_grad_focal_loss = disable_torch_grad_focal_loss
        self.eps = eps

    def forward(self, x, y):
        """"
        Parameters
        ----------
        x: input logits
        y: targets (multi-label binarized vector)
        """

        # Calculating Probabilities
        x_sigmoid = torch.sigmoid(x)
        xs_pos = x_sigmoid
        xs_neg = 1 - x_sigmoid

        # Asymmetric Clipping
        if self.clip is not None and self.clip > 0:
            xs_neg = (xs_neg + self.clip).clamp(max=1)

        # Basic CE calculation
        los_pos = y * torch.log(xs_pos.clamp(min=self.eps))
        los_neg = (1 - y) * torch.log(xs_neg.clamp(min=self.eps))
        loss = los_pos + los_neg

        # Asymmetric Focusing
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            if self.disable_torch_grad_focal_loss:
                torch.set_grad_enabled(False)
            pt0 = xs_pos * y
            pt1 = xs_neg * (1 - y)  # pt = p if t > 0 else 1-p
            pt = pt0 + pt1
            one_sided_gamma = self.gamma_pos * y + self.gamma_neg * (1 - y)
            one_sided_w = torch.pow(1 - pt, one_sided_gamma)
            if self.disable_torch_grad_focal_loss:
                torch.set_grad_enabled(True)
            loss *= one_sided_w

        return -loss.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("disable", [True, False])
@pytest.mark.parametrize("gammas", [(4, 0), (4, 1), (2, 3)])
def test_asl_matches_reference(dtype, disable, gammas):
    gamma_neg, gamma_pos = gammas
    z, y = make_batch(7, dtype)
    kw = dict(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=0.05, eps=1e-8, disable_torch_grad_focal_loss=disable)
    ours = AsymmetricLoss(**kw)
    ref = ReferenceAsymmetricLoss(**kw)
    v, g = value_and_grad(lambda t: ours(t, y), z)
    v_ref, g_ref = value_and_grad(lambda t: ref(t, y.to(dtype)), z)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    # and the independent formula, with the focusing weight constant iff disable=True
    if dtype == torch.float64:
        v_o, g_o = value_and_grad(
            lambda t: asl_oracle(t, y, gamma_neg, gamma_pos, 0.05, 1e-8, detach_w=disable), z
        )
        torch.testing.assert_close(v, v_o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, g_o, rtol=1e-9, atol=1e-12)


def test_asl_disable_grad_focal_changes_gradient_only():
    z, y = make_batch(8)
    v_on, g_on = value_and_grad(lambda t: AsymmetricLoss(gamma_pos=1, disable_torch_grad_focal_loss=True)(t, y), z)
    v_off, g_off = value_and_grad(lambda t: AsymmetricLoss(gamma_pos=1, disable_torch_grad_focal_loss=False)(t, y), z)
    torch.testing.assert_close(v_on, v_off, rtol=0, atol=0)
    assert (g_on - g_off).abs().max() > 1e-3


@pytest.mark.parametrize("disable", [True, False])
def test_asl_leaves_grad_mode_unchanged(disable):
    z, y = make_batch(9)
    loss = AsymmetricLoss(disable_torch_grad_focal_loss=disable)
    assert torch.is_grad_enabled()
    out = loss(z, y)
    assert torch.is_grad_enabled() and out.requires_grad
    with torch.no_grad():
        out = loss(z, y)
        assert not torch.is_grad_enabled()  # the reference would have switched grad back on here
    assert not out.requires_grad
    torch.set_grad_enabled(False)
    try:
        loss(z, y)
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)


def test_asl_mean_reduction():
    z, y = make_batch(10)
    s = AsymmetricLoss()(z, y)
    m = AsymmetricLoss(reduction="mean")(z, y)
    torch.testing.assert_close(m, s / z.numel())


# --------------------------------------------------------------------------------------------------
# (4) targets: bool / uint8 / float are interchangeable
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_target_dtypes_identical(name):
    z, y = make_batch(12, torch.float32)
    loss = build_loss(name, FREQ, N_TRAIN)
    results = [value_and_grad(lambda t: loss(t, y.to(dt)), z) for dt in (torch.bool, torch.uint8, torch.float32)]
    for v, g in results[1:]:
        assert torch.equal(v, results[0][0]) and torch.equal(g, results[0][1])


# --------------------------------------------------------------------------------------------------
# (5) build_loss
# --------------------------------------------------------------------------------------------------
def test_registry_names():
    assert sorted(LOSSES.names()) == sorted(NAMES)


def test_unknown_name_lists_choices_before_anything_else():
    with pytest.raises(KeyError) as exc:
        build_loss("nope", None, None, also_bad=1)
    msg = str(exc.value)
    assert "nope" in msg and all(n in msg for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_param_names_keyword_and_loss(name):
    with pytest.raises(TypeError) as exc:
        build_loss(name, FREQ, N_TRAIN, bogus_param=3)
    assert "bogus_param" in str(exc.value) and repr(name) in str(exc.value)


def test_statistics_cannot_be_passed_as_params():
    with pytest.raises(TypeError, match="class_freq"):
        build_loss("db", FREQ, N_TRAIN, class_freq=FREQ)
    with pytest.raises(TypeError, match="focal"):
        build_loss("db_focal", FREQ, N_TRAIN, focal=False)


def test_build_passes_params_and_statistics():
    db = build_loss("db_focal", FREQ, N_TRAIN, map_gamma=0.2, neg_scale=2.0)
    assert isinstance(db, DistributionBalancedLoss) and db.focal and db.map_gamma == 0.2 and db.neg_scale == 2.0
    assert db.class_freq.tolist() == [float(f) for f in FREQ] and db.num_train == N_TRAIN
    assert not build_loss("db", FREQ, N_TRAIN).focal
    cb = build_loss("cb_focal", FREQ, N_TRAIN, beta=0.99)
    assert isinstance(cb, ClassBalancedFocalLoss) and cb.beta == 0.99
    # losses without class statistics ignore them
    assert isinstance(build_loss("bce", None, None), nn.Module)
    assert build_loss("asl", None, None, gamma_neg=2).gamma_neg == 2


@pytest.mark.parametrize("bad", [[0, 5, 7], [3, -1, 4], [[1, 2], [3, 4]], []])
def test_bad_class_freq(bad):
    with pytest.raises(ValueError):
        build_loss("db", bad, 100)


def test_class_freq_must_be_below_num_train_for_prior_losses():
    with pytest.raises(ValueError):
        build_loss("db", [5, 100], 100)
    with pytest.raises(ValueError):
        build_loss("pg", [5, 100], 100)
    build_loss("cb_focal", [5, 100], 100)  # CB has no prior log-odds


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    loss = build_loss(name, FREQ, N_TRAIN)
    z, y = make_batch(13)
    with pytest.raises(ValueError):
        loss(z, y[:, :-1])
    with pytest.raises(ValueError):
        build_loss(name, FREQ, N_TRAIN, reduction="median")


def test_class_count_mismatch():
    z, y = make_batch(14, c=C - 1)
    with pytest.raises(ValueError):
        build_loss("db", FREQ, N_TRAIN)(z, y)


# --------------------------------------------------------------------------------------------------
# (6) details
# --------------------------------------------------------------------------------------------------
def test_sum_reduction_is_numel_times_mean():
    z, y = make_batch(15)
    for name in ("bce", "focal", "db", "db_focal", "cb_focal", "pg"):
        m = build_loss(name, FREQ, N_TRAIN)(z, y)
        s = build_loss(name, FREQ, N_TRAIN, reduction="sum")(z, y)
        torch.testing.assert_close(s, m * z.numel())


def test_db_loss_weight_scales():
    z, y = make_batch(16)
    base = build_loss("db_focal", FREQ, N_TRAIN)(z, y)
    torch.testing.assert_close(build_loss("db_focal", FREQ, N_TRAIN, loss_weight=3.0)(z, y), 3 * base)


def test_samples_without_positives():
    z, y = make_batch(17)
    y = y.clone()
    y[2] = False
    db = build_loss("db", FREQ, N_TRAIN)
    w = db.rebalance_weight(y.double())
    torch.testing.assert_close(w[2], torch.full((C,), 1.1, dtype=torch.float64))
    cb = build_loss("cb_focal", FREQ, N_TRAIN)
    torch.testing.assert_close(cb.cb_weight(y.double())[2], torch.full((1,), 0.1, dtype=torch.float64))
    for name in ("db", "db_focal", "cb_focal", "pg"):
        v, g = value_and_grad(lambda t: build_loss(name, FREQ, N_TRAIN)(t, y), z)
        assert torch.isfinite(v) and torch.isfinite(g).all()
    # cb oracle uses the same n -> inf convention for empty rows
    v, _ = value_and_grad(lambda t: build_loss("cb_focal", FREQ, N_TRAIN)(t, y), z)
    torch.testing.assert_close(v, cb_oracle(z, y, FREQ).detach(), rtol=1e-10, atol=0)


def test_db_does_not_modify_logits_in_place():
    z, y = make_batch(18)
    before = z.detach().clone()
    build_loss("db_focal", FREQ, N_TRAIN)(z, y)
    assert torch.equal(z.detach(), before)


def test_db_rebalance_weight_example():
    # two classes, n = (10, 40): a sample with both labels has r = (0.8, 0.2)
    db = DistributionBalancedLoss([10, 40], 100)
    w = db.rebalance_weight(torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    expected = [1 / (1 + math.exp(-10 * (0.8 - 0.3))) + 0.1, 1 / (1 + math.exp(-10 * (0.2 - 0.3))) + 0.1]
    torch.testing.assert_close(w, torch.tensor([expected], dtype=torch.float64))


def test_pg_reduces_to_focal_and_bce():
    z, y = make_batch(19)
    pg0 = build_loss("pg", FREQ, N_TRAIN, tau_pos=0.0, tau_neg=0.0, delta=0.0)
    torch.testing.assert_close(pg0(z, y), build_loss("focal", FREQ, N_TRAIN)(z, y), rtol=1e-12, atol=1e-12)
    pg_bce = build_loss("pg", FREQ, N_TRAIN, tau_pos=0.0, tau_neg=0.0, gamma=0.0)
    torch.testing.assert_close(pg_bce(z, y), build_loss("bce", FREQ, N_TRAIN)(z, y), rtol=1e-12, atol=1e-12)


def test_buffers_follow_module_and_stay_out_of_state_dict():
    for name in ("db", "cb_focal", "pg"):
        loss = build_loss(name, FREQ, N_TRAIN)
        assert loss.state_dict() == {}
        assert all(b.dtype == torch.float64 for b in loss.buffers())


@pytest.mark.parametrize("name", NAMES)
def test_statistics_follow_logits_device(name):
    # the loss module is never moved; its class statistics must follow the logits ("meta" stands in
    # for an accelerator so this runs on CPU-only machines)
    z = torch.randn(3, 4, device="meta")
    y = torch.ones(3, 4, device="meta", dtype=torch.bool)
    assert build_loss(name, [3, 5, 7, 9], 100)(z, y).device.type == "meta"


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_logits_computed_in_float32(name):
    z64, y = make_batch(20)
    z16 = z64.detach().to(torch.bfloat16).requires_grad_()
    v, g = value_and_grad(lambda t: build_loss(name, FREQ, N_TRAIN)(t, y), z16)
    assert v.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert torch.isfinite(v) and torch.isfinite(g.float()).all()
    v_ref = build_loss(name, FREQ, N_TRAIN)(z16.detach().float(), y)
    torch.testing.assert_close(v, v_ref.detach())


# --------------------------------------------------------------------------------------------------
# fused form (what training uses when the kernels config is not "reference")
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fused_build_gives_the_fused_form_only_where_one_exists(name):
    plain, fused = build_loss(name, FREQ, N_TRAIN), build_loss(name, FREQ, N_TRAIN, fused=True)
    if name == "asl":
        assert type(fused) is FusedAsymmetricLoss
    else:
        assert type(fused) is type(plain)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("params", [dict(), dict(gamma_neg=2, gamma_pos=1, clip=0.1, reduction="mean"),
                                    dict(disable_torch_grad_focal_loss=False)])
def test_fused_asl_matches_the_module(backend, params):
    if backend == "cpu":
        from cssfe.ops.backends import native

        if native.load()[0] is None:
            pytest.skip("no C++ compiler to build the extension")
    z, y = make_batch(5, dtype=torch.float32, b=37, c=11)
    plain, fused = AsymmetricLoss(**params), build_loss("asl", FREQ, N_TRAIN, fused=True, **params)
    v_ref, g_ref = value_and_grad(lambda t: plain(t, y), z.double().detach().requires_grad_())
    with ops.use_backend(backend):
        v, g = value_and_grad(lambda t: fused(t, y), z.detach().requires_grad_())
    torch.testing.assert_close(v.double(), v_ref, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# (7) CB-Focal with logit regularisation and loss_weight, against a float64 transcription of the
# reference ResampleLoss (wutong16/DistributionBalancedLoss, mllt/models/losses/resample_loss.py at
# 2567764: reweight_func='CB', focal on, logit_reg=dict(neg_scale, init_bias)); mmdet's
# binary_cross_entropy is BCE-with-logits with an elementwise weight, reduction 'none'.
# --------------------------------------------------------------------------------------------------
class ResampleLossCBTranscription:
    def __init__(self, class_freq, train_num, CB_beta=0.9, CB_mode="average_w", gamma=2, balance_param=2.0,
                 logit_reg=None, loss_weight=1.0):
        self.class_freq = torch.tensor(class_freq, dtype=torch.float64)
        self.train_num = float(train_num)
        self.CB_beta, self.CB_mode = CB_beta, CB_mode
        self.gamma, self.balance_param, self.loss_weight = gamma, balance_param, loss_weight
        self.logit_reg = logit_reg or {}
        self.neg_scale = self.logit_reg["neg_scale"] if "neg_scale" in self.logit_reg else 1.0
        init_bias = self.logit_reg["init_bias"] if "init_bias" in self.logit_reg else 0.0
        self.init_bias = -torch.log(self.train_num / self.class_freq - 1) * init_bias / self.neg_scale

    def cb_weight(self, gt_labels):
        cb = lambda n: torch.tensor(1 - self.CB_beta, dtype=torch.float64) / (1 - torch.pow(self.CB_beta, n))
        if "by_class" in self.CB_mode:
            return cb(self.class_freq)
        if "average_n" in self.CB_mode:
            return cb(torch.sum(gt_labels * self.class_freq, dim=1, keepdim=True) / torch.sum(gt_labels, dim=1, keepdim=True))
        if "average_w" in self.CB_mode:
            return torch.sum(gt_labels * cb(self.class_freq), dim=1, keepdim=True) / torch.sum(gt_labels, dim=1, keepdim=True)
        min_n, _ = torch.min(gt_labels * self.class_freq + (1 - gt_labels) * 100000, dim=1, keepdim=True)
        return cb(min_n)

    def logit_reg_functions(self, labels, logits, weight):
        if not self.logit_reg:
            return logits, weight
        if "init_bias" in self.logit_reg:
            logits = logits + self.init_bias  # the reference adds in place; a copy here
        if "neg_scale" in self.logit_reg:
            logits = logits * (1 - labels) * self.neg_scale + logits * labels
            weight = weight / self.neg_scale * (1 - labels) + weight * labels
        return logits, weight

    def __call__(self, cls_score, label):
        label = label.double()
        weight = self.cb_weight(label)
        cls_score, weight = self.logit_reg_functions(label, cls_score, weight)
        logpt = -nn.functional.binary_cross_entropy_with_logits(cls_score.clone(), label, reduction="none")
        pt = torch.exp(logpt)
        loss = nn.functional.binary_cross_entropy_with_logits(cls_score, label, weight=weight.expand_as(label),
                                                              reduction="none")
        loss = self.balance_param * ((1 - pt) ** self.gamma) * loss
        return (self.loss_weight * loss).mean()  # mllt's parse_losses takes the mean


CB_REFERENCE_CASES = [
    # CPRFL's LT-VOC CB-Focal setup
    dict(CB_mode="by_class", logit_reg=dict(init_bias=0.05, neg_scale=5.0), loss_weight=10.0),
    dict(CB_mode="by_class", logit_reg=dict(init_bias=0.05, neg_scale=2.0), loss_weight=10.0),  # LT-COCO
    dict(CB_mode="average_w", logit_reg=dict(neg_scale=3.0)),
    dict(CB_mode="min_n", logit_reg=dict(init_bias=0.1), loss_weight=2.0),
    dict(CB_mode="average_n", logit_reg=None, loss_weight=5.0),
]


@pytest.mark.parametrize("case", CB_REFERENCE_CASES)
def test_cb_focal_logit_reg_and_loss_weight_match_the_reference(case):
    z, y = make_batch(21)
    reference = ResampleLossCBTranscription(FREQ, N_TRAIN, **case)
    params = {"mode": case["CB_mode"], "loss_weight": case.get("loss_weight", 1.0)}
    if case["logit_reg"] is not None:
        params["logit_reg"] = case["logit_reg"]
    loss = build_loss("cb_focal", FREQ, N_TRAIN, **params)
    v, g = value_and_grad(lambda t: loss(t, y), z)
    v_ref, g_ref = value_and_grad(lambda t: reference(t, y), z)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)
    # the options change the loss: the transcription without them disagrees
    plain = ResampleLossCBTranscription(FREQ, N_TRAIN, CB_mode=case["CB_mode"])
    assert not torch.allclose(v, plain(z, y).detach(), rtol=1e-6)


def test_cb_focal_defaults_unchanged_and_options_checked():
    z, y = make_batch(22)
    torch.testing.assert_close(build_loss("cb_focal", FREQ, N_TRAIN)(z, y),
                               build_loss("cb_focal", FREQ, N_TRAIN, logit_reg=None, loss_weight=1.0)(z, y))
    with pytest.raises(ValueError, match="unknown key.*neg_bias"):
        build_loss("cb_focal", FREQ, N_TRAIN, logit_reg=dict(neg_bias=0.1))
    with pytest.raises(ValueError, match="neg_scale must be > 0"):
        build_loss("cb_focal", FREQ, N_TRAIN, logit_reg=dict(neg_scale=0))
    with pytest.raises(ValueError, match="< num_train"):  # the prior log-odds need n_k < N
        build_loss("cb_focal", [5, 100], 100, logit_reg=dict(init_bias=0.05))


def test_cb_focal_logit_reg_from_the_config(tmp_path):
    """``loss.params.logit_reg`` in a YAML config reaches the loss."""
    from cssfe.config import load_config

    path = tmp_path / "cb.yaml"
    path.write_text("loss:\n  name: cb_focal\n  params:\n    mode: by_class\n    loss_weight: 10\n"
                    "    logit_reg: {init_bias: 0.05, neg_scale: 5}\n")
    cfg = load_config(str(path), [])
    loss = build_loss(cfg.loss.name, FREQ, N_TRAIN, **cfg.loss.params)
    assert (loss.init_bias, loss.neg_scale, loss.loss_weight, loss.mode) == (0.05, 5.0, 10.0, "by_class")
