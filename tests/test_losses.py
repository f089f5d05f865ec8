"""Tests for distill_ray.kd.losses against independent float64 reference formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from distill_ray.kd import feature_losses as FL
from distill_ray.kd import labels as LB
from distill_ray.kd import losses as L

PROB_KINDS = tuple(k for k in L.KD_KINDS if k != "mse_logits")
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(*shape: int, seed: int = 0, scale: float = 2.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# float64 references, written with plain softmax/log rather than the module's log-space core


def _ref_per_position(s, t, kind, T, alpha=0.1):
    s, t = s.double(), t.double()
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    return _ref_from_probs(p, q, kind, alpha, s=s / T, t=t / T) * T**2


def _ref_from_probs(p, q, kind, alpha=0.1, s=None, t=None):
    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "js":
        m = (p + q) / 2
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if kind == "soft_ce":
        return -(p * q.log()).sum(-1)
    if kind == "mse_logits":
        return ((s - t) ** 2).mean(-1)
    raise AssertionError(kind)


def _ref(s, t, kind, T, alpha=0.1):
    return _ref_per_position(s, t, kind, T, alpha).mean()


# ---------------------------------------------------------------------------------------------
# kd_divergence


@pytest.mark.parametrize("kind", L.KD_KINDS)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_kd_divergence_matches_float64_reference(kind, T):
    s, t = _logits(6, 9, seed=1), _logits(6, 9, seed=2)
    expected = _ref(s, t, kind, T)
    assert_close(L.kd_divergence(s.double(), t.double(), kind, T), expected, rtol=1e-10, atol=1e-12)
    got32 = L.kd_divergence(s, t, kind, T)
    assert got32.dtype == torch.float32
    assert_close(got32.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", L.KD_KINDS)
def test_kd_divergence_sequence_shape_matches_reference(kind):
    s, t = _logits(2, 5, 7, seed=3), _logits(2, 5, 7, seed=4)
    assert_close(L.kd_divergence(s.double(), t.double(), kind, 2.0), _ref(s, t, kind, 2.0))


@pytest.mark.parametrize("alpha", (0.0, 0.3, 1.0))
@pytest.mark.parametrize("kind", ("skew_kl", "skew_reverse_kl"))
def test_skew_alpha(kind, alpha):
    s, t = _logits(4, 6, seed=5), _logits(4, 6, seed=6)
    got = L.kd_divergence(s.double(), t.double(), kind, 1.5, skew_alpha=alpha)
    assert_close(got, _ref(s, t, kind, 1.5, alpha))
    if alpha == 0.0:  # no skew: plain KL
        plain = "forward_kl" if kind == "skew_kl" else "reverse_kl"
        assert_close(got, L.kd_divergence(s.double(), t.double(), plain, 1.5))
    if alpha == 1.0:
        assert_close(got, torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("kind", L.KD_KINDS)
def test_zero_at_equality_except_soft_ce(kind):
    t = _logits(5, 8, seed=7)
    got = L.kd_divergence(t.clone(), t, kind, 2.0)
    if kind == "soft_ce":
        p = torch.softmax(t.double() / 2.0, -1)
        entropy = -(p * p.log()).sum(-1).mean() * 4.0
        assert_close(got.double(), entropy, rtol=1e-5, atol=1e-6)
    else:
        assert_close(got, torch.zeros(()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", L.KD_KINDS)
def test_nonnegative_on_random_inputs(kind):
    s, t = _logits(64, 10, seed=8, scale=3.0), _logits(64, 10, seed=9, scale=3.0)
    per_row = torch.stack([L.kd_divergence(s[i : i + 1], t[i : i + 1], kind, 1.0) for i in range(64)])
    assert per_row.min().item() >= -1e-6


def test_js_and_tvd_symmetric():
    s, t = _logits(8, 11, seed=10), _logits(8, 11, seed=11)
    for kind in ("js", "tvd"):
        assert_close(L.kd_divergence(s, t, kind, 2.0), L.kd_divergence(t, s, kind, 2.0))


def test_js_bounded_by_log2():
    s, t = _logits(8, 11, seed=12, scale=20.0), _logits(8, 11, seed=13, scale=20.0)
    assert L.kd_divergence(s, t, "js", 1.0).item() <= math.log(2) + 1e-6


@pytest.mark.parametrize("T", TEMPERATURES)
def test_forward_kl_equals_torch_kl_div(T):
    s, t = _logits(7, 13, seed=14), _logits(7, 13, seed=15)
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
    assert_close(L.kd_divergence(s, t, "forward_kl", T), expected * T**2)


@pytest.mark.parametrize("kind", L.KD_KINDS)
def test_temperature_squared_scaling(kind):
    s, t = _logits(5, 6, seed=16).double(), _logits(5, 6, seed=17).double()
    T = 3.0
    assert_close(L.kd_divergence(s, t, kind, T), T**2 * L.kd_divergence(s / T, t / T, kind, 1.0))


def test_unknown_kind_raises_listing_kinds():
    s = _logits(2, 3)
    for fn in (
        lambda: L.kd_divergence(s, s, "kl"),
        lambda: L.kd_divergence_to_probs(s, torch.softmax(s, -1), "kl"),
        lambda: L.topk_kd_divergence(s, *L.teacher_topk(s, 2), kind="kl"),
    ):
        with pytest.raises(ValueError) as info:
            fn()
        assert "'kl'" in str(info.value)
        for kind in L.KD_KINDS:
            assert kind in str(info.value)


def test_invalid_temperature_and_shapes_raise():
    s = _logits(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        L.kd_divergence(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="differ"):
        L.kd_divergence(s, _logits(2, 4))
    with pytest.raises(ValueError, match="skew_alpha"):
        L.kd_divergence(s, s, "skew_kl", skew_alpha=1.5)


# ---------------------------------------------------------------------------------------------
# masking


def _masked_batch(seed=20):
    s, t = _logits(3, 6, 10, seed=seed), _logits(3, 6, 10, seed=seed + 1)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    mask[2, 1:3] = False
    return s, t, mask


@pytest.mark.parametrize("kind", L.KD_KINDS)
def test_mask_equals_unmasked_rows_flattened(kind):
    s, t, mask = _masked_batch()
    got = L.kd_divergence(s, t, kind, 2.0, mask)
    assert_close(got, L.kd_divergence(s[mask], t[mask], kind, 2.0))
    assert_close(got.double(), _ref(s[mask], t[mask], kind, 2.0), rtol=1e-5, atol=1e-6)
    # a 0/1 float mask means the same
    assert_close(L.kd_divergence(s, t, kind, 2.0, mask.float()), got)


@pytest.mark.parametrize("kind", L.KD_KINDS)
def test_masked_positions_do_not_change_loss(kind):
    s, t, mask = _masked_batch()
    noise_s, noise_t = _logits(3, 6, 10, seed=30, scale=9.0), _logits(3, 6, 10, seed=31, scale=9.0)
    s2 = torch.where(mask[..., None], s, noise_s)
    t2 = torch.where(mask[..., None], t, noise_t)
    assert_close(L.kd_divergence(s2, t2, kind, 2.0, mask), L.kd_divergence(s, t, kind, 2.0, mask))


@pytest.mark.parametrize("kind", L.KD_KINDS)
def test_all_masked_is_zero_with_zero_grad(kind):
    s = _logits(2, 3, 5, seed=32).requires_grad_(True)
    t = _logits(2, 3, 5, seed=33)
    loss = L.kd_divergence(s, t, kind, 2.0, torch.zeros(2, 3))
    assert_close(loss, torch.zeros(()), rtol=0, atol=0)
    loss.backward()
    assert_close(s.grad, torch.zeros_like(s), rtol=0, atol=0)


def test_row_mask_for_2d_inputs():
    s, t = _logits(6, 5, seed=34), _logits(6, 5, seed=35)
    mask = torch.tensor([1, 0, 1, 1, 0, 1])
    assert_close(L.kd_divergence(s, t, "js", 1.0, mask), L.kd_divergence(s[mask.bool()], t[mask.bool()], "js", 1.0))
    with pytest.raises(ValueError, match="mask"):
        L.kd_divergence(s, t, mask=torch.ones(6, 2))


# ---------------------------------------------------------------------------------------------
# gradients and dtypes


@pytest.mark.parametrize("kind", L.KD_KINDS)
def test_gradient_reaches_student_only(kind):
    s = _logits(4, 7, seed=36).requires_grad_(True)
    t = _logits(4, 7, seed=37).requires_grad_(True)
    L.kd_divergence(s, t, kind, 2.0).backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum().item() > 0


def test_forward_kl_gradient_matches_closed_form():
    # d/ds KL(p || softmax(s/T)) * T^2 / B = T * (q - p) / B
    s = _logits(4, 7, seed=38).double().requires_grad_(True)
    t = _logits(4, 7, seed=39).double()
    T = 2.0
    L.kd_divergence(s, t, "forward_kl", T).backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) / 4
    assert_close(s.grad, expected)


@pytest.mark.parametrize("kind", L.KD_KINDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_inputs_upcast(kind, dtype):
    s, t = _logits(4, 9, seed=40, dtype=dtype), _logits(4, 9, seed=41, dtype=dtype)
    got = L.kd_divergence(s, t, kind, 2.0)
    assert got.dtype == torch.float32
    assert_close(got, L.kd_divergence(s.float(), t.float(), kind, 2.0))


# ---------------------------------------------------------------------------------------------
# kd_divergence_to_probs


@pytest.mark.parametrize("kind", PROB_KINDS)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_to_probs_agrees_with_logits(kind, T):
    s, t = _logits(5, 3, 8, seed=42), _logits(5, 3, 8, seed=43)
    mask = torch.rand(5, 3, generator=_gen(44)) > 0.3
    expected = L.kd_divergence(s, t, kind, T, mask)
    assert_close(L.kd_divergence_to_probs(s, torch.softmax(t / T, -1), kind, T, mask), expected)
    got64 = L.kd_divergence_to_probs(s.double(), torch.softmax(t.double() / T, -1), kind, T, mask)
    assert_close(got64, L.kd_divergence(s.double(), t.double(), kind, T, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", PROB_KINDS)
def test_to_probs_mixture_reference_and_zero_probs(kind):
    # a two-teacher mixture with classes ruled out by both teachers (exact zeros)
    s = _logits(4, 6, seed=45).double()
    probs = torch.softmax(_logits(4, 6, seed=46).double(), -1)
    probs[:, :2] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    got = L.kd_divergence_to_probs(s, probs, kind, 2.0)
    assert torch.isfinite(got)
    q = torch.softmax(s / 2.0, -1)
    expected = _ref_from_probs(probs.clamp_min(1e-12), q, kind).mean() * 4.0
    assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_to_probs_rejects_mse_logits():
    s = _logits(2, 3)
    with pytest.raises(ValueError, match="mse_logits"):
        L.kd_divergence_to_probs(s, torch.softmax(s, -1), "mse_logits")


def test_to_probs_teacher_gets_no_grad():
    s = _logits(3, 4, seed=47).requires_grad_(True)
    probs = torch.softmax(_logits(3, 4, seed=48), -1).requires_grad_(True)
    L.kd_divergence_to_probs(s, probs, "js", 2.0).backward()
    assert probs.grad is None and s.grad is not None


# ---------------------------------------------------------------------------------------------
# top-k


def test_teacher_topk_values_and_dtypes():
    t = _logits(2, 3, 10, seed=50, dtype=torch.float16)
    values, indices = L.teacher_topk(t, 4)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == (2, 3, 4) and indices.shape == (2, 3, 4)
    full = torch.log_softmax(t.float(), -1)
    assert_close(values, full.gather(-1, indices))
    assert_close(values, full.sort(-1, descending=True).values[..., :4])
    with pytest.raises(ValueError):
        L.teacher_topk(t, 11)


@pytest.mark.parametrize("kind", PROB_KINDS)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_topk_equals_full_when_k_is_vocab(kind, T):
    s, t = _logits(3, 4, 9, seed=51), _logits(3, 4, 9, seed=52)
    mask = torch.rand(3, 4, generator=_gen(53)) > 0.25
    values, indices = L.teacher_topk(t, 9)
    got = L.topk_kd_divergence(s, values, indices, kind, T, mask)
    assert_close(got, L.kd_divergence(s, t, kind, T, mask), rtol=1e-5, atol=1e-5)


def _ref_bucket(s, values, indices, kind, T):
    """k + 1 bucket divergence in float64, written out directly."""
    s, values = s.double(), values.double()
    vocab, k = s.shape[-1], values.shape[-1]
    q_full = torch.softmax(s / T, -1)
    q_top = q_full.gather(-1, indices.long())
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    tail = 1 - values.exp().sum(-1, keepdim=True)
    weights = torch.cat([values.exp() ** (1 / T), (vocab - k) * (tail / (vocab - k)) ** (1 / T)], -1)
    p = weights / weights.sum(-1, keepdim=True)
    return _ref_from_probs(p, q, kind) * T**2


def test_topk_forward_kl_at_t1_equals_bucket_formula():
    s, t = _logits(6, 12, seed=54), _logits(6, 12, seed=55)
    values, indices = L.teacher_topk(t, 4)
    got = L.topk_kd_divergence(s, values, indices, "forward_kl", 1.0)
    q = torch.softmax(s.double(), -1)
    p_top = values.double().exp()
    q_top = q.gather(-1, indices)
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    direct = (p_top * (p_top / q_top).log()).sum(-1) + p_tail * (p_tail / q_tail).log()
    assert_close(got.double(), direct.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", PROB_KINDS)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_topk_partial_matches_bucket_reference(kind, T):
    s, t = _logits(5, 12, seed=56), _logits(5, 12, seed=57)
    values, indices = L.teacher_topk(t, 5)
    got = L.topk_kd_divergence(s, values, indices, kind, T)
    assert_close(got.double(), _ref_bucket(s, values, indices, kind, T).mean(), rtol=1e-5, atol=1e-6)


def test_topk_accepts_fp16_values_and_int32_indices():
    s, t = _logits(2, 3, 10, seed=58), _logits(2, 3, 10, seed=59)
    values, indices = L.teacher_topk(t, 4)
    half_values, int_indices = values.half(), indices.int()
    got = L.topk_kd_divergence(s, half_values, int_indices, "forward_kl", 2.0)
    assert_close(got, L.topk_kd_divergence(s, half_values.float(), indices, "forward_kl", 2.0))
    assert_close(got, L.topk_kd_divergence(s, values, indices, "forward_kl", 2.0), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kind", PROB_KINDS)
def test_topk_empty_tail_has_finite_grads(kind):
    # k = V, and k < V with a teacher so peaked that the stored mass rounds to >= 1 in fp16
    s = _logits(3, 6, seed=60).requires_grad_(True)
    peaked = torch.zeros(3, 6)
    peaked[:, 0] = 40.0
    for k in (6, 2):
        values, indices = L.teacher_topk(peaked, k)
        loss = L.topk_kd_divergence(s, values.half(), indices.int(), kind, 2.0)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()
    # the all-but-empty tail bucket behaves like the full computation
    values, indices = L.teacher_topk(peaked, 2)
    assert_close(
        L.topk_kd_divergence(s, values, indices, "forward_kl", 1.0),
        L.kd_divergence(s, peaked, "forward_kl", 1.0),
        rtol=1e-5,
        atol=1e-5,
    )


def test_topk_masking_and_gradients():
    s, t, mask = _masked_batch(seed=61)
    s = s.requires_grad_(True)
    values, indices = L.teacher_topk(t, 3)
    values.requires_grad_(True)
    got = L.topk_kd_divergence(s, values, indices, "reverse_kl", 2.0, mask)
    assert_close(got, L.topk_kd_divergence(s[mask], values[mask], indices[mask], "reverse_kl", 2.0))
    got.backward()
    assert values.grad is None and torch.isfinite(s.grad).all()
    none = L.topk_kd_divergence(s, values, indices, "js", 2.0, torch.zeros(3, 6))
    assert_close(none, torch.zeros(()), rtol=0, atol=0)


def test_topk_rejects_mse_and_bad_shapes():
    s = _logits(2, 5)
    values, indices = L.teacher_topk(s, 2)
    with pytest.raises(ValueError, match="mse_logits"):
        L.topk_kd_divergence(s, values, indices, "mse_logits")
    with pytest.raises(ValueError):
        L.topk_kd_divergence(s, values[:, :1], indices)


# ---------------------------------------------------------------------------------------------
# focal KD


def test_focal_kd_gamma_zero_is_forward_kl():
    s, t, mask = _masked_batch(seed=62)
    assert_close(L.focal_kd(s, t, 2.0, gamma=0.0, mask=mask), L.kd_divergence(s, t, "forward_kl", 2.0, mask))


@pytest.mark.parametrize("gamma", (0.5, 1.0, 2.0))
def test_focal_kd_matches_reference(gamma):
    s, t = _logits(8, 6, seed=63), _logits(8, 6, seed=64)
    T = 2.0
    p, q = torch.softmax(t.double() / T, -1), torch.softmax(s.double() / T, -1)
    kl = (p * (p / q).log()).sum(-1)
    expected = ((1 - torch.exp(-kl)) ** gamma * kl * T**2).mean()
    assert_close(L.focal_kd(s, t, T, gamma).double(), expected, rtol=1e-5, atol=1e-6)


def test_focal_kd_gradients_and_equality():
    s = _logits(4, 5, seed=65).requires_grad_(True)
    t = _logits(4, 5, seed=66).requires_grad_(True)
    L.focal_kd(s, t, 1.0, 2.0).backward()
    assert t.grad is None and torch.isfinite(s.grad).all()
    same = _logits(4, 5, seed=67).requires_grad_(True)
    loss = L.focal_kd(same, same.detach().clone(), 1.0, 0.5)
    (grad,) = torch.autograd.grad(loss, same)
    assert_close(loss, torch.zeros(()), atol=1e-7, rtol=0)
    assert torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------
# margin KD


def _ref_margin_kd_rows(s, t, T, gamma, keep):
    """Per row, one row at a time in float64 Python: w_i * KL_i * T^2 with w_i = m_i^gamma / mean over the
    kept rows of m^gamma, m_i the teacher's top-1 minus top-2 tempered probability; 0 for dropped rows."""
    s = s.double()
    rows, weights = [], []
    for i in range(s.shape[0]):
        p = [math.exp(v / T) for v in t[i].double().tolist()]
        p = [v / sum(p) for v in p]
        first, second = sorted(p, reverse=True)[:2]
        weights.append((first - second) ** gamma)
        q = torch.softmax(s[i] / T, -1)  # the student's side stays a tensor: the gradient flows through it
        rows.append(sum(p_c * (math.log(p_c) - torch.log(q[c])) for c, p_c in enumerate(p)) * T**2)
    kept = [w for w, k in zip(weights, keep) if k]
    mean_w = sum(kept) / len(kept)
    return torch.stack([w / mean_w * r if k else r * 0.0 for w, r, k in zip(weights, rows, keep)])


@pytest.mark.parametrize("gamma", (0.5, 1.0, 2.0))
@pytest.mark.parametrize("T", (1.0, 4.0))
def test_margin_kd_matches_a_float64_loop_reference_in_value_and_gradient(gamma, T):
    s, t = _logits(8, 6, seed=90), _logits(8, 6, seed=91)
    t[2, 4] = t[2].max()  # row 2: the teacher ties, margin 0, weight 0, no gradient
    keep = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1])
    for mask in (None, keep):
        kept = [True] * 8 if mask is None else keep.bool().tolist()
        student, student64 = s.clone().requires_grad_(True), s.double().requires_grad_(True)
        got = L.margin_kd(student, t, T, gamma, mask=mask)
        expected_rows = _ref_margin_kd_rows(student64, t, T, gamma, kept)
        expected = expected_rows.sum() / sum(kept)
        assert got.dtype == torch.float32
        assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(got, student)
        (grad64,) = torch.autograd.grad(expected, student64)
        assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)
        assert (grad[2] == 0).all() and not grad[[i for i in range(8) if kept[i] and i != 2]].eq(0).all()
        rows = L.margin_kd(s, t, T, gamma, mask=mask, reduction="none")
        assert_close(rows.double(), expected_rows.detach(), rtol=1e-5, atol=1e-6)
    # float64 inputs stay float64 and meet the reference at float64 precision
    got64 = L.margin_kd(s.double(), t.double(), T, gamma, mask=keep)
    assert_close(got64, _ref_margin_kd_rows(s, t, T, gamma, keep.bool().tolist()).sum() / keep.sum(),
                 rtol=1e-10, atol=1e-12)


def test_margin_kd_with_gamma_zero_is_exactly_forward_kl():
    s, t, mask = _masked_batch(seed=92)
    for student, teacher, T in ((s, t, 2.0), (s[0], t[0], 0.5)):  # per token and per row
        assert_close(L.margin_kd(student, teacher, T, gamma=0.0), L.kd_divergence(student, teacher, "forward_kl", T),
                     rtol=0, atol=0)
    assert_close(L.margin_kd(s, t, 2.0, gamma=0.0, mask=mask), L.kd_divergence(s, t, "forward_kl", 2.0, mask),
                 rtol=0, atol=0)
    assert_close(L.margin_kd(s, t, 2.0, gamma=0.0, mask=mask, reduction="none"),
                 L.kd_divergence(s, t, "forward_kl", 2.0, mask, reduction="none"), rtol=0, atol=0)


def test_margin_kd_up_weights_confident_rows_and_its_weights_average_to_one():
    s, t = _logits(6, 5, seed=93), _logits(6, 5, seed=94)
    weights = L.margin_kd(s, t, 2.0, 1.0, reduction="none") / L.kd_divergence(s, t, "forward_kl", 2.0,
                                                                               reduction="none")
    top2 = torch.softmax(t / 2.0, -1).topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    assert_close(weights, margin / margin.mean())
    assert_close(weights.mean(), torch.tensor(1.0))
    assert torch.equal(weights.argsort(), margin.argsort())  # the larger the margin, the larger the weight


def test_margin_kd_teacher_gets_no_gradient_and_edge_batches_stay_finite():
    s = _logits(4, 5, seed=95).requires_grad_(True)
    t = _logits(4, 5, seed=96).requires_grad_(True)
    L.margin_kd(s, t, 2.0, 1.5).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # every row a tie: no margin to prefer one row by, so uniform weights (forward KL), not 0 / 0
    tied = torch.zeros(4, 5)
    assert_close(L.margin_kd(s, tied, 2.0, 1.0), L.kd_divergence(s, tied, "forward_kl", 2.0))
    # all masked: exactly 0 with a zero gradient, as every loss here
    student = s.detach().clone().requires_grad_(True)
    loss = L.margin_kd(student, t, 2.0, 1.0, mask=torch.zeros(4))
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0 and (grad == 0).all()
    with pytest.raises(ValueError, match="gamma"):
        L.margin_kd(s, t, gamma=-0.5)
    with pytest.raises(ValueError, match="2 classes"):
        L.margin_kd(s[:, :1], t[:, :1])


# ---------------------------------------------------------------------------------------------
# DKD


def _ref_dkd_paper(s, t, labels, alpha, beta, T):
    """The authors' formulation (mdistiller): cat-masked probs and the -1000 target trick."""
    s, t = s.double(), t.double()
    gt = F.one_hot(labels, s.shape[1]).double()
    other = 1 - gt
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="sum") * T**2 / s.shape[0]
    nckd = (
        F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), torch.softmax(t / T - 1000.0 * gt, 1), reduction="sum")
        * T**2
        / s.shape[0]
    )
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("T", (1.0, 4.0))
def test_dkd_matches_paper_reference(T):
    s, t = _logits(10, 7, seed=70), _logits(10, 7, seed=71)
    labels = torch.randint(7, (10,), generator=_gen(72))
    for alpha, beta in ((1.0, 8.0), (0.5, 2.0)):
        expected = _ref_dkd_paper(s, t, labels, alpha, beta, T)
        assert_close(L.dkd(s.double(), t.double(), labels, alpha, beta, T), expected, rtol=1e-10, atol=1e-12)
        assert_close(L.dkd(s, t, labels, alpha, beta, T).double(), expected, rtol=1e-5, atol=1e-6)


def test_dkd_decomposition_identity():
    s, t = _logits(10, 7, seed=73).double(), _logits(10, 7, seed=74).double()
    labels = torch.randint(7, (10,), generator=_gen(75))
    T = 3.0
    tckd, nckd = L.dkd_parts(s, t, labels, T)
    assert tckd.shape == nckd.shape == (10,)
    p_target = torch.softmax(t / T, 1).gather(1, labels[:, None]).squeeze(1)
    full_kl = _ref_per_position(s, t, "forward_kl", T)
    assert_close(tckd + (1 - p_target) * nckd, full_kl)
    assert_close((tckd + nckd).mean(), L.dkd(s, t, labels, 1.0, 1.0, T))


def test_dkd_gradients():
    s = _logits(4, 5, seed=76).requires_grad_(True)
    t = _logits(4, 5, seed=77).requires_grad_(True)
    L.dkd(s, t, torch.tensor([0, 4, 2, 2])).backward()
    assert t.grad is None and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------------
# hints and attention transfer


def test_hint_loss_mse_and_cosine_reference():
    s, t = _logits(4, 6, 5, seed=80), _logits(4, 6, 5, seed=81)
    mask = torch.rand(4, 6, generator=_gen(82)) > 0.3
    sd, td = s.double()[mask], t.double()[mask]
    mse = ((sd - td) ** 2).mean(-1).mean()
    cos = (1 - (sd * td).sum(-1) / (sd.norm(dim=-1) * td.norm(dim=-1))).mean()
    assert_close(FL.hint_loss(s, t, kind="mse", mask=mask).double(), mse, rtol=1e-5, atol=1e-6)
    assert_close(FL.hint_loss(s, t, kind="cosine", mask=mask).double(), cos, rtol=1e-5, atol=1e-6)
    assert_close(FL.hint_loss(s[:, 0], t[:, 0]).double(), ((s[:, 0].double() - t[:, 0].double()) ** 2).mean())


def test_hint_loss_projector_gradients():
    torch.manual_seed(0)
    projector = FL.HintProjector(3, 5)
    s = _logits(4, 3, seed=83).requires_grad_(True)
    t = _logits(4, 5, seed=84).requires_grad_(True)
    loss = FL.hint_loss(s, t, projector, "cosine")
    expected = (1 - F.cosine_similarity(projector(s).double(), t.double(), dim=-1)).mean()
    assert_close(loss.double(), expected)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert projector.linear.weight.grad is not None and projector.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="HintProjector"):
        FL.hint_loss(s, t)
    with pytest.raises(ValueError, match="mse, cosine"):
        FL.hint_loss(s, s, kind="l1")


def test_attention_map_and_transfer_cnn():
    s, t = _logits(3, 4, 5, 6, seed=85), _logits(3, 8, 5, 6, seed=86)  # channel counts differ
    ref_map = s.double().pow(2).mean(1).flatten(1)
    ref_map = ref_map / ref_map.norm(dim=1, keepdim=True)
    assert_close(FL.attention_map(s).double(), ref_map)
    t_map = t.double().pow(2).mean(1).flatten(1)
    t_map = t_map / t_map.norm(dim=1, keepdim=True)
    expected = ((ref_map - t_map) ** 2).sum(1).mean()
    assert_close(FL.attention_transfer(s, t).double(), expected)
    assert_close(FL.attention_transfer(t, t.clone()), torch.zeros(()), atol=1e-7, rtol=0)


def test_attention_transfer_transformer_maps_p1_and_grads():
    s = torch.softmax(_logits(2, 4, 7, 7, seed=87), -1).requires_grad_(True)
    t = torch.softmax(_logits(2, 12, 7, 7, seed=88), -1).requires_grad_(True)
    ref = lambda x: F.normalize(x.double().abs().mean(1).flatten(1), dim=1)  # noqa: E731
    expected = ((ref(s.detach()) - ref(t.detach())) ** 2).sum(1).mean()
    loss = FL.attention_transfer(s, t, p=1)
    assert_close(loss.double(), expected)
    loss.backward()
    assert t.grad is None and torch.isfinite(s.grad).all()


def test_attention_transfer_size_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 5, 5\)"):
        FL.attention_transfer(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 5, 5))


# ---------------------------------------------------------------------------------------------
# hard labels, mixup, cutmix


@pytest.mark.parametrize("eps", (0.0, 0.1, 0.3))
def test_label_smoothing_matches_cross_entropy(eps):
    logits = _logits(9, 6, seed=90)
    labels = torch.randint(6, (9,), generator=_gen(91))
    assert_close(LB.label_smoothing_ce(logits, labels, eps), F.cross_entropy(logits, labels, label_smoothing=eps))
    labels[[1, 4]] = -100
    assert_close(LB.label_smoothing_ce(logits, labels, eps), F.cross_entropy(logits, labels, label_smoothing=eps))


def test_label_smoothing_sequences_mask_and_empty():
    logits = _logits(2, 5, 7, seed=92).requires_grad_(True)
    labels = torch.randint(7, (2, 5), generator=_gen(93))
    labels[0, 4] = -100
    mask = torch.ones(2, 5)
    mask[1, :2] = 0
    counted = (labels != -100) & mask.bool()
    expected = F.cross_entropy(logits[counted], labels[counted], label_smoothing=0.2)
    assert_close(LB.label_smoothing_ce(logits, labels, 0.2, mask), expected)
    none = LB.label_smoothing_ce(logits, torch.full((2, 5), -100), 0.2)
    assert_close(none, torch.zeros(()), rtol=0, atol=0)
    none.backward()
    assert_close(logits.grad, torch.zeros_like(logits), rtol=0, atol=0)


def test_mixup_formula_and_determinism():
    x = _logits(6, 3, 4, seed=94)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, soft, perm, lam = LB.mixup(x, y, 5, alpha=0.4, generator=_gen(7))
    mixed2, soft2, perm2, lam2 = LB.mixup(x, y, 5, alpha=0.4, generator=_gen(7))
    assert lam == lam2 and 0.0 <= lam <= 1.0
    assert torch.equal(perm, perm2) and torch.equal(mixed, mixed2) and torch.equal(soft, soft2)
    assert sorted(perm.tolist()) == list(range(6))
    assert_close(mixed, lam * x + (1 - lam) * x[perm])
    onehot = F.one_hot(y, 5).float()
    assert_close(soft, lam * onehot + (1 - lam) * onehot[perm])
    assert_close(soft.sum(-1), torch.ones(6))
    different = [LB.mixup(x, y, 5, alpha=0.4, generator=_gen(seed))[3] for seed in range(8, 12)]
    assert len(set(different + [lam])) == 5


def test_mixup_lam_override_and_alpha_zero():
    x, y = _logits(4, 3, seed=95), torch.tensor([0, 1, 2, 1])
    mixed, soft, perm, lam = LB.mixup(x, y, 3, generator=_gen(1), lam=0.25)
    assert lam == 0.25
    assert_close(mixed, 0.25 * x + 0.75 * x[perm])
    _, soft_off, _, lam_off = LB.mixup(x, y, 3, alpha=0.0, generator=_gen(1))
    assert lam_off == 1.0 and torch.equal(soft_off, F.one_hot(y, 3).float())


@pytest.mark.parametrize("alpha", (0.2, 1.0, 2.0))
def test_beta_sampler_moments(alpha):
    generator = _gen(123)
    draws = torch.tensor([LB.sample_beta(alpha, generator) for _ in range(4000)], dtype=torch.float64)
    variance = 1.0 / (4.0 * (2.0 * alpha + 1.0))  # Beta(a, a)
    assert abs(draws.mean().item() - 0.5) < 4 * math.sqrt(variance / 4000)
    assert_close(draws.var().item(), variance, rtol=0.1, atol=0)
    assert ((draws >= 0) & (draws <= 1)).all()


def test_cutmix_box_and_lam():
    images = torch.arange(4 * 2 * 8 * 10, dtype=torch.float32).reshape(4, 2, 8, 10)
    y = torch.tensor([0, 1, 2, 3])
    mixed, soft, perm, lam = LB.cutmix(images, y, 4, alpha=1.0, generator=_gen(3), lam=0.6)
    again = LB.cutmix(images, y, 4, alpha=1.0, generator=_gen(3), lam=0.6)
    assert torch.equal(mixed, again[0]) and torch.equal(perm, again[2]) and lam == again[3]
    changed = (mixed != images).any(1)  # [B, H, W]; every pixel value is distinct
    moved = perm != torch.arange(4)
    box = changed[moved.nonzero()[0, 0]]
    assert not changed[~moved].any()
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert box[top:bottom, left:right].all() and box.sum() == (bottom - top) * (right - left)
    assert_close(lam, 1.0 - box.sum().item() / 80)
    assert_close(mixed[:, :, top:bottom, left:right], images[perm][:, :, top:bottom, left:right])
    onehot = F.one_hot(y, 4).float()
    assert_close(soft, lam * onehot + (1 - lam) * onehot[perm])


def test_cutmix_sampled_lam_matches_box_area():
    images = torch.randn(5, 1, 16, 16, generator=_gen(4))
    for seed in range(5):
        mixed, _, perm, lam = LB.cutmix(images, torch.arange(5), 5, generator=_gen(seed))
        changed = (mixed != images).any(1)
        moved = (perm != torch.arange(5)).nonzero()
        if len(moved):
            assert_close(lam, 1.0 - changed[moved[0, 0]].sum().item() / 256)


# ---------------------------------------------------------------------------------------------


def test_dense_from_topk_is_exact_when_k_is_all_classes_and_a_distribution_otherwise():
    from distill_ray.kd.losses import dense_from_topk, teacher_topk

    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 3
    full = torch.log_softmax(logits, -1)
    torch.testing.assert_close(dense_from_topk(*teacher_topk(logits, 10), 10), full)
    values, indices = teacher_topk(logits, 3)
    dense = dense_from_topk(values, indices, 10)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(6))
    torch.testing.assert_close(dense.gather(-1, indices), full.gather(-1, indices))
    assert (dense.argmax(-1) == full.argmax(-1)).all()
    tail = torch.ones(6, 10, dtype=torch.bool).scatter_(-1, indices, False)
    expected_tail = (1 - values.exp().sum(-1, keepdim=True)) / 7
    torch.testing.assert_close(dense.exp()[tail].view(6, 7), expected_tail.expand(6, 7))


@pytest.mark.parametrize("kind", ["forward_kl", "js", "mse_logits"])
def test_per_row_reduction_averages_to_the_batch_mean_and_zeroes_masked_rows(kind):
    """``reduction="none"`` is what the loop weighs per row (labeled: alpha * KD + (1 - alpha) * task,
    unlabeled: KD alone): its mean is the scalar loss, masked rows are exactly 0."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    rows = L.kd_divergence(student, teacher, kind=kind, temperature=2.0, reduction="none")
    assert rows.shape == (6,) and (rows >= 0).all()
    assert_close(rows.mean(), L.kd_divergence(student, teacher, kind=kind, temperature=2.0))
    mask = torch.tensor([1, 0, 1, 1, 0, 1])
    masked = L.kd_divergence(student, teacher, kind=kind, temperature=2.0, mask=mask, reduction="none")
    assert_close(masked, rows * mask)
    probs = torch.softmax(teacher / 2.0, -1)
    if kind != "mse_logits":
        assert_close(L.kd_divergence_to_probs(student, probs, kind=kind, temperature=2.0, reduction="none"), rows)
    with pytest.raises(ValueError, match="reduction"):
        L.kd_divergence(student, teacher, kind=kind, reduction="sum")


# --- generalized JSD (on-policy distillation's divergence, TRL's GKD definition) ------------------

def _gjsd_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, T: float) -> torch.Tensor:
    """TRL's generalized_jsd_loss written out in float64 over the full vocabulary, meaned over positions, x T^2."""
    s = torch.log_softmax(student_logits.double() / T, -1)
    t = torch.log_softmax(teacher_logits.double() / T, -1)
    if beta == 0:
        per = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        per = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
        per = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return per.mean() * T**2


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_gjsd_with_every_class_kept_equals_the_float64_reference(beta, T):
    from distill_ray.kd.losses import topk_generalized_jsd

    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 5, 11, generator=g) * 2, torch.randn(2, 5, 11, generator=g) * 2
    logp, idx = torch.log_softmax(teacher.double(), -1).topk(11, -1)
    got = topk_generalized_jsd(student.double(), logp, idx, beta, temperature=T)
    torch.testing.assert_close(got, _gjsd_reference(student, teacher, beta, T), rtol=1e-10, atol=1e-12)


def test_topk_gjsd_ends_are_forward_and_reverse_kl_and_its_middle_is_js():
    from distill_ray.kd.losses import topk_generalized_jsd

    g = torch.Generator().manual_seed(4)
    student = torch.randn(3, 7, 40, generator=g, requires_grad=True)
    logp, idx = torch.log_softmax(torch.randn(3, 7, 40, generator=g), -1).topk(6, -1)
    mask = torch.rand(3, 7, generator=g) > 0.3
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl"), (0.5, "js")):
        got = topk_generalized_jsd(student, logp, idx, beta, temperature=2.0, mask=mask)
        want = L.topk_kd_divergence(student, logp, idx, kind=kind, temperature=2.0, mask=mask)
        torch.testing.assert_close(got, want)
        g_got, = torch.autograd.grad(got, student)
        g_want, = torch.autograd.grad(want, student)
        torch.testing.assert_close(g_got, g_want)


def test_topk_gjsd_is_zero_when_the_student_is_the_teacher_and_rejects_a_bad_beta():
    from distill_ray.kd.losses import topk_generalized_jsd

    teacher = torch.randn(4, 9, generator=torch.Generator().manual_seed(5)).double()
    logp, idx = torch.log_softmax(teacher, -1).topk(9, -1)
    for beta in (0.0, 0.3, 1.0):
        assert float(topk_generalized_jsd(teacher, logp, idx, beta)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="beta"):
        topk_generalized_jsd(teacher, logp, idx, 1.5)
