"""The GSD loss against independently computed values (float64 numpy)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradual_sd import GradualDistillationLoss, feature_l2, feature_mse, kl_divergence, soft_cross_entropy
from gradual_sd._losses import distillation_pairs


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def reference_total(logits, features, targets, T, beta, alpha, teacher, formulation, aux=0.0):
    """The METHOD.md objective, term by term, from numpy arrays."""
    n_heads = len(logits)
    total = -np_log_softmax(logits[-1])[np.arange(len(targets)), targets].mean()
    for s in range(n_heads - 1):
        t = s + 1 if teacher == "neighbour" else n_heads - 1
        p_t = np.exp(np_log_softmax(logits[t] / T))
        log_p_s = np_log_softmax(logits[s] / T)
        if formulation == "reference":
            kl = -(p_t * log_p_s).sum(axis=1).mean()
            feat = np.sqrt(((features[s] - features[t]) ** 2).sum())
        else:
            kl = (p_t * (np.log(p_t) - log_p_s)).sum(axis=1).mean() * T * T
            feat = ((features[s] - features[t]) ** 2).sum(axis=1).mean()
        total += beta * kl + alpha * feat
        if aux:
            total += aux * -np_log_softmax(logits[s])[np.arange(len(targets)), targets].mean()
    return total


@given(
    heads=st.integers(1, 5),
    batch=st.integers(1, 6),
    classes=st.integers(2, 9),
    T=st.sampled_from([1.0, 3.0, 4.5]),
    teacher=st.sampled_from(["neighbour", "deepest"]),
    formulation=st.sampled_from(["reference", "normalized"]),
    aux=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_total_matches_reference(heads, batch, classes, T, teacher, formulation, aux, seed):
    rng = np.random.default_rng(seed)
    logits = [rng.normal(size=(batch, classes)) * 3 for _ in range(heads)]
    features = [rng.normal(size=(batch, 16)) for _ in range(heads)]
    targets = rng.integers(0, classes, size=batch)
    loss = GradualDistillationLoss(T, 0.3, 0.01, teacher, formulation, aux_ce_weight=aux)
    total, terms = loss(
        [torch.tensor(z) for z in logits], [torch.tensor(f) for f in features], torch.tensor(targets)
    )
    expected = reference_total(logits, features, targets, T, 0.3, 0.01, teacher, formulation, aux)
    assert total.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    assert len(terms) == 1 + (heads - 1) * (3 if aux else 2)


def test_term_names_follow_heads():
    loss = GradualDistillationLoss()
    z = [torch.randn(4, 3) for _ in range(3)]
    _, terms = loss(z, [torch.randn(4, 8) for _ in range(3)], torch.tensor([0, 1, 2, 0]), ["a", "b", "fc"])
    assert list(terms) == ["ce", "kl/a", "feature/a", "kl/b", "feature/b"]


def test_soft_cross_entropy_and_kl_share_gradients_up_to_t_squared():
    student = torch.randn(5, 7, requires_grad=True)
    teacher = torch.randn(5, 7)
    (g_ce,) = torch.autograd.grad(soft_cross_entropy(student, teacher, 3.0), student)
    (g_kl,) = torch.autograd.grad(kl_divergence(student, teacher, 3.0), student)
    torch.testing.assert_close(g_kl, 9.0 * g_ce)


def test_feature_terms():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    assert feature_l2(a, b).item() == pytest.approx(torch.dist(a, b).item(), rel=1e-6)
    assert feature_mse(a, b).item() == pytest.approx(((a - b) ** 2).sum(1).mean().item(), rel=1e-6)
    # The reference term grows with the batch; the normalised one does not.
    assert feature_l2(torch.cat([a, a]), torch.cat([b, b])).item() == pytest.approx(
        np.sqrt(2) * feature_l2(a, b).item(), rel=1e-5
    )
    assert feature_mse(torch.cat([a, a]), torch.cat([b, b])).item() == pytest.approx(
        feature_mse(a, b).item(), rel=1e-5
    )


@pytest.mark.parametrize("teacher", ["neighbour", "deepest"])
def test_teachers_receive_no_gradient_from_their_pair(teacher):
    """Only the student of each pair is pushed: a head's gradient comes from pairs where it is
    the student (and CE for the last head), never from pairs where it teaches."""
    heads = 4
    logits = [torch.randn(3, 5, requires_grad=True) for _ in range(heads)]
    feats = [torch.randn(3, 8, requires_grad=True) for _ in range(heads)]
    targets = torch.tensor([0, 4, 2])
    loss = GradualDistillationLoss(teacher=teacher)
    _, terms = loss(logits, feats, targets, [str(i) for i in range(heads)])
    for s, _teacher in distillation_pairs(heads, teacher):
        grads = torch.autograd.grad(
            terms[f"kl/{s}"] + terms[f"feature/{s}"], logits + feats, allow_unused=True, retain_graph=True
        )
        for i in range(heads):
            for g in (grads[i], grads[heads + i]):
                if i == s:
                    assert g is not None and g.abs().sum() > 0
                else:
                    assert g is None or g.abs().sum() == 0
    grads = torch.autograd.grad(terms["ce"], logits, allow_unused=True)
    assert grads[-1] is not None and all(g is None for g in grads[:-1])


def test_pairs():
    assert distillation_pairs(4, "neighbour") == [(0, 1), (1, 2), (2, 3)]
    assert distillation_pairs(4, "deepest") == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(ValueError, match="teacher must be one of"):
        distillation_pairs(3, "oracle")


def test_bfloat16_inputs_are_computed_in_float32():
    z = [torch.randn(4, 6).bfloat16() for _ in range(2)]
    f = [torch.randn(4, 8).bfloat16() for _ in range(2)]
    total, terms = GradualDistillationLoss()(z, f, torch.tensor([1, 2, 3, 0]))
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())


def test_probability_targets():
    z = [torch.randn(4, 3)]
    probs = torch.softmax(torch.randn(4, 3), 1)
    total, _ = GradualDistillationLoss()(z, [torch.randn(4, 2)], probs)
    expected = -(probs * torch.log_softmax(z[0], 1)).sum(1).mean()
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize(
    "targets, error, match",
    [
        (torch.tensor([0, 1, 2]), ValueError, r"shape \(4,\)"),
        (torch.tensor([[0], [1], [2], [0]]), ValueError, r"shape \(4,\)"),
        (torch.tensor([0, 1, 2, 5]), ValueError, r"\[0, 2\] for 3 classes"),
        (torch.tensor([0, -1, 2, 1]), ValueError, r"\[0, 2\]"),
        (torch.tensor([True, False, True, True]), TypeError, "dtype torch.bool"),
        (torch.rand(4, 5), ValueError, r"\(4, 3\)"),
        ([0, 1, 2, 0], TypeError, "tensor"),
    ],
)
def test_bad_targets_raise(targets, error, match):
    with pytest.raises(error, match=match):
        GradualDistillationLoss()([torch.randn(4, 3)], [torch.randn(4, 2)], targets)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0}, "temperature"),
        ({"kl_weight": -1}, "kl_weight"),
        ({"feature_weight": float("nan")}, "feature_weight"),
        ({"teacher": "last"}, "teacher must be one of"),
        ({"formulation": "paper"}, "formulation must be one of"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualDistillationLoss(**kwargs)


def test_target_range_check_can_be_turned_off():
    loss = GradualDistillationLoss(check_target_range=False)
    with pytest.raises(IndexError):  # cross-entropy's own (CPU) error, no longer ours
        loss([torch.randn(2, 3)], [torch.randn(2, 4)], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):  # shape checks stay: they cost nothing
        loss([torch.randn(2, 3)], [torch.randn(2, 4)], torch.tensor([0, 1, 2]))
