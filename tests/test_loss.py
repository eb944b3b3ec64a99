"""The PBSD loss against a hand-computed float64 reference (plain Python `math`, no torch autograd)."""

import math

import pytest
import torch

from pbsd_trl.loss import (
    all_pairs,
    implicit_log_ratios,
    matched_pairs,
    pair_labels_of,
    pbsd_loss,
    preference_labels,
)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def reference(policy_t, teacher_t, policy_s, teacher_s, pairs, labels, beta, eps, len_t=None, len_s=None):
    """Loss, margins and d loss / d policy log-probs, from the method note's equations."""
    lr_t = [
        (p - q) / (n if n else 1) for p, q, n in zip(policy_t, teacher_t, len_t or [1] * len(policy_t), strict=True)
    ]
    lr_s = [
        (p - q) / (n if n else 1) for p, q, n in zip(policy_s, teacher_s, len_s or [1] * len(policy_s), strict=True)
    ]
    kept = [(i, j, y) for (i, j), y in zip(pairs, labels, strict=True) if y != 0]
    margins = [beta * y * (lr_t[i] - lr_s[j]) for (i, j), y in zip(pairs, labels, strict=True)]
    grad_t, grad_s = [0.0] * len(policy_t), [0.0] * len(policy_s)
    total = 0.0
    for i, j, y in kept:
        m = beta * y * (lr_t[i] - lr_s[j])
        total += -(1 - eps) * _log_sigmoid(m) - eps * _log_sigmoid(-m)
        # d/dm [-(1-ε) log σ(m) - ε log σ(-m)] = -(1-ε) σ(-m) + ε σ(m)
        dm = -(1 - eps) * _sigmoid(-m) + eps * _sigmoid(m)
        grad_t[i] += dm * beta * y / ((len_t or [1] * len(policy_t))[i] or 1) / len(kept)
        grad_s[j] -= dm * beta * y / ((len_s or [1] * len(policy_s))[j] or 1) / len(kept)
    return total / max(len(kept), 1), margins, grad_t, grad_s


POLICY_T = [-3.0, -5.5, -1.25, -8.0]
TEACHER_T = [-2.0, -6.0, -1.0, -7.5]
POLICY_S = [-4.0, -2.5, -3.0, -6.0]
TEACHER_S = [-3.5, -4.0, -2.0, -6.5]
LEN_T = [3, 5, 1, 8]
LEN_S = [4, 2, 3, 0]


def _run(pairs, labels, beta=0.5, eps=0.0, length_normalize=False):
    policy_t = torch.tensor(POLICY_T, dtype=torch.float64, requires_grad=True)
    policy_s = torch.tensor(POLICY_S, dtype=torch.float64, requires_grad=True)
    len_t = torch.tensor(LEN_T) if length_normalize else None
    len_s = torch.tensor(LEN_S) if length_normalize else None
    lr_t = implicit_log_ratios(policy_t, torch.tensor(TEACHER_T, dtype=torch.float64), len_t)
    lr_s = implicit_log_ratios(policy_s, torch.tensor(TEACHER_S, dtype=torch.float64), len_s)
    loss, margins = pbsd_loss(lr_t, lr_s, pairs, labels.double(), beta, eps)
    loss.backward()
    ref = reference(
        POLICY_T,
        TEACHER_T,
        POLICY_S,
        TEACHER_S,
        pairs.tolist(),
        labels.tolist(),
        beta,
        eps,
        LEN_T if length_normalize else None,
        LEN_S if length_normalize else None,
    )
    return (loss.item(), margins.tolist(), policy_t.grad.tolist(), policy_s.grad.tolist()), ref


def _assert_close(actual, expected):
    loss, margins, grad_t, grad_s = actual
    ref_loss, ref_margins, ref_grad_t, ref_grad_s = expected
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    assert margins == pytest.approx(ref_margins, rel=1e-12, abs=1e-12)
    assert grad_t == pytest.approx(ref_grad_t, rel=1e-10, abs=1e-12)
    assert grad_s == pytest.approx(ref_grad_s, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_role_labels_matched(length_normalize, eps):
    labels = preference_labels(torch.zeros(4), None, "role")
    assert labels.tolist() == [1.0] * 4
    _assert_close(*_run(matched_pairs(4), labels, eps=eps, length_normalize=length_normalize))


def test_role_labels_all_pairs():
    groups_t = torch.tensor([0, 0, 1, 1])
    groups_s = torch.tensor([0, 0, 1, 1])
    pairs = all_pairs(groups_t, groups_s)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    _assert_close(*_run(pairs, torch.ones(len(pairs)), beta=0.3))


@pytest.mark.parametrize("tie_policy", ["role", "drop"])
def test_reward_labels_with_ties(tie_policy):
    teacher_rewards = torch.tensor([1.0, 0.0, 0.5, float("nan")])
    student_rewards = torch.tensor([0.0, 1.0, 0.5, float("nan")])
    labels = preference_labels(teacher_rewards, student_rewards, "reward", tie_policy)
    tie = 1.0 if tie_policy == "role" else 0.0
    assert labels.tolist() == [1.0, -1.0, tie, tie]
    _assert_close(*_run(matched_pairs(4), labels, beta=1.0))


def test_reward_labels_all_pairs_with_smoothing_and_normalization():
    teacher_rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    student_rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])
    pairs = all_pairs(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    labels = preference_labels(teacher_rewards[pairs[:, 0]], student_rewards[pairs[:, 1]], "reward", "drop")
    assert (labels == 0).any() and (labels == -1).any() and (labels == 1).any()
    _assert_close(*_run(pairs, labels, beta=0.7, eps=0.2, length_normalize=True))


def test_nan_reward_loses_against_a_number():
    labels = preference_labels(torch.tensor([float("nan"), 0.0]), torch.tensor([0.0, float("nan")]), "reward")
    assert labels.tolist() == [-1.0, 1.0]


def test_all_pairs_dropped_gives_differentiable_zero():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, _ = pbsd_loss(policy, policy * 2, matched_pairs(2), torch.zeros(2), beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and policy.grad.abs().sum().item() == 0.0


def test_gradient_matches_method_note_formula():
    """∇ℓ = −β σ(−m) [∇log π_θ(y⁺) − ∇log π_θ(y⁻)] for one role-labelled pair."""
    beta = 0.25
    chosen = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    teacher_chosen, teacher_rejected = (
        torch.tensor([-2.5], dtype=torch.float64),
        torch.tensor([-0.5], dtype=torch.float64),
    )
    loss, margins = pbsd_loss(
        implicit_log_ratios(chosen, teacher_chosen),
        implicit_log_ratios(rejected, teacher_rejected),
        matched_pairs(1),
        torch.ones(1, dtype=torch.float64),
        beta,
    )
    loss.backward()
    m = beta * ((-2.0 + 2.5) - (-1.0 + 0.5))
    assert margins.item() == pytest.approx(m)
    assert chosen.grad.item() == pytest.approx(-beta * _sigmoid(-m))
    assert rejected.grad.item() == pytest.approx(beta * _sigmoid(-m))


def test_loss_saturates_once_pair_is_ordered():
    """Unlike KL matching, the gradient vanishes as the margin grows (the paper's stability argument)."""
    grads = []
    for gap in (0.0, 10.0, 50.0):
        chosen = torch.tensor([gap], requires_grad=True)
        loss, _ = pbsd_loss(chosen, torch.zeros(1), matched_pairs(1), torch.ones(1), beta=1.0)
        loss.backward()
        grads.append(abs(chosen.grad.item()))
    assert grads[0] == pytest.approx(0.5) and grads[1] < 1e-4 and grads[2] < 1e-20


def test_all_pairs_leaves_out_teacher_rows_without_a_sample_and_sum_reduction():
    """The trainer's `pairing="all"` path: rows 1 and 3 carry no teacher sample (`num_teacher_generations=1`)."""
    groups = torch.tensor([0, 0, 1, 1])
    has_teacher = torch.tensor([True, False, True, False])
    pairs = all_pairs(groups, groups, has_teacher)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (0, 1), (2, 2), (2, 3)]
    teacher_rewards = torch.tensor([1.0, float("nan"), 0.0, float("nan")])
    student_rewards = torch.tensor([0.0, 1.0, 0.0, 1.0])
    labels = pair_labels_of(pairs, teacher_rewards, student_rewards, "reward", "drop")
    expected = {(0, 0): 1.0, (0, 1): 0.0, (2, 2): 0.0, (2, 3): -1.0}
    assert labels.tolist() == [expected[tuple(p)] for p in pairs.tolist()]
    (loss, margins, grad_t, grad_s), (ref_loss, ref_margins, ref_grad_t, ref_grad_s) = _run(pairs, labels, beta=0.4)
    _assert_close((loss, margins, grad_t, grad_s), (ref_loss, ref_margins, ref_grad_t, ref_grad_s))
    lr_t = torch.tensor(POLICY_T, dtype=torch.float64) - torch.tensor(TEACHER_T, dtype=torch.float64)
    lr_s = torch.tensor(POLICY_S, dtype=torch.float64) - torch.tensor(TEACHER_S, dtype=torch.float64)
    total, _ = pbsd_loss(lr_t, lr_s, pairs, labels.double(), 0.4, reduction="sum")
    kept = sum(1 for y in labels.tolist() if y != 0)
    assert total.item() == pytest.approx(ref_loss * kept, rel=1e-12)
    with pytest.raises(ValueError, match="Unknown reduction 'none'"):
        pbsd_loss(lr_t, lr_s, pairs, labels.double(), 0.4, reduction="none")
