"""The PBSD loss against a hand-computed float64 reference (plain Python `math`, no torch autograd)."""

import math

import pytest
import torch

from pbsd_trl.loss import (
    ACCURACY_TOLERANCE,
    PairTable,
    Samples,
    implicit_log_ratios,
    make_pairs,
    pair_statistics,
    pbsd_loss,
    pearson_from_sums,
    preference_labels,
    sequence_hashes,
)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# A batch of 2 prompts x 4 rows. Sample order: the 8 student samples, then the 8 teacher samples.
GROUPS = [0, 0, 0, 0, 1, 1, 1, 1]
POLICY_S = [-4.0, -2.5, -3.0, -6.0, -1.0, -2.0, -7.0, -3.5]
TEACHER_S = [-3.5, -4.0, -2.0, -6.5, -1.5, -2.5, -5.0, -3.0]
POLICY_T = [-3.0, -5.5, -1.25, -8.0, -2.0, -4.0, -0.5, -6.0]
TEACHER_T = [-2.0, -6.0, -1.0, -7.5, -2.5, -3.0, -1.0, -5.5]
LEN_S = [4, 2, 3, 0, 1, 5, 2, 2]
LEN_T = [3, 5, 1, 8, 2, 2, 4, 1]
REWARD_S = [0.0, 1.0, 0.5, float("nan"), 1.0, 0.0, 0.0, 0.25]
REWARD_T = [1.0, 1.0, 0.0, 0.5, 1.0, 1.0, float("nan"), 0.0]


def _reference_pairs(pairing, pair_labels, tie_policy, tau, weighting, has_teacher):
    """`[(a, b, target, weight)]` by enumeration, from the module docstring's definitions."""
    n = len(GROUPS)
    group = GROUPS + GROUPS
    teacher = [False] * n + [True] * n
    valid = [True] * n + list(has_teacher)
    reward = REWARD_S + REWARD_T
    if pair_labels == "policy_gradient":  # every two scored student samples of a prompt
        pairs = [(a, b) for a in range(n) for b in range(a) if group[a] == group[b]]
        return [
            (a, b, 0.5 if ra == rb else float(ra > rb), 1.0, ra - rb)
            for a, b in pairs
            if not math.isnan(ra := reward[a]) and not math.isnan(rb := reward[b])
        ]
    if pairing == "matched":
        candidates = [(n + i, i) for i in range(n) if valid[n + i]]
    else:
        both = [(a, b) for a in range(2 * n) for b in range(2 * n) if valid[a] and valid[b] and group[a] == group[b]]
        if pairing == "all":
            candidates = [(a, b) for a, b in both if teacher[a] and not teacher[b]]
        else:  # each unordered pair once, the later sample first (a mixed pair: the teacher sample first)
            candidates = [(a, b) for a, b in both if a > b]
    tilted = {}
    if weighting == "tilted":
        for g in set(GROUPS):
            members = [a for a in range(n, 2 * n) if valid[a] and group[a] == g]
            scored = [a for a in members if not math.isnan(reward[a])]
            exps = {a: (math.exp(reward[a] / tau) if a in scored else 0.0) if scored else 1.0 for a in members}
            total = sum(exps.values())
            tilted.update({a: len(members) * exps[a] / total for a in members})
    out = []
    for a, b in candidates:
        ra, rb = reward[a], reward[b]
        weight = tilted.get(a, 1.0) if weighting == "tilted" else 1.0
        if pair_labels == "role":
            out.append((a, b, 1.0, weight))
            continue
        mixed = teacher[a] and not teacher[b]
        if math.isnan(ra) or math.isnan(rb):
            tie = math.isnan(ra) and math.isnan(rb)
            target = 0.5 if tie else (0.0 if math.isnan(ra) else 1.0)
        else:
            tie = ra == rb and pair_labels == "reward"
            target = _sigmoid((ra - rb) / tau) if pair_labels == "soft" else float(ra > rb)
        if tie:
            if tie_policy == "role" and mixed:
                target = 1.0
            else:
                continue  # dropped
        out.append((a, b, target, weight))
    return out


def reference(pairing="matched", pair_labels="role", tie_policy="role", tau=1.0, weighting="uniform", **kw):
    """Loss and d loss / d policy log-probs (students then teachers), from the method note's equations."""
    beta, eps, normalize = kw.get("beta", 0.5), kw.get("eps", 0.0), kw.get("length_normalize", False)
    loss_type = kw.get("loss_type", "sigmoid")
    has_teacher = kw.get("has_teacher", [True] * len(GROUPS))
    policy, teacher_logps = POLICY_S + POLICY_T, TEACHER_S + TEACHER_T
    lengths = [max(n, 1) if normalize else 1 for n in LEN_S + LEN_T]
    rho = [(p - q) / n for p, q, n in zip(policy, teacher_logps, lengths, strict=True)]
    labels = "policy_gradient" if loss_type == "kl_regularized_pg" else pair_labels
    pairs = _reference_pairs(pairing, labels, tie_policy, tau, weighting, has_teacher)
    total_weight = sum(pair[3] for pair in pairs)
    grad = [0.0] * len(policy)
    total = 0.0
    constant = sum(_sigmoid(-beta * (rho[a] - rho[b])) for a, b, *_ in pairs) / max(len(pairs), 1)
    for a, b, p, w, *gap in pairs:
        m = beta * (rho[a] - rho[b])
        if loss_type == "kl_regularized_pg":  # ℓ = −sg(Δr − m)·m/β
            total += -w * (gap[0] - m) * m / beta
            grad[a] += -w * (gap[0] - m) / lengths[a] / total_weight
            grad[b] += w * (gap[0] - m) / lengths[b] / total_weight
        elif loss_type == "sigmoid":
            q = (1 - eps) * p + eps * (1 - p)
            total += w * (-q * _log_sigmoid(m) - (1 - q) * _log_sigmoid(-m))
            dm = -q * _sigmoid(-m) + (1 - q) * _sigmoid(m)  # d/dm [-q log σ(m) - (1-q) log σ(-m)]
            grad[a] += w * dm * beta / lengths[a] / total_weight
            grad[b] -= w * dm * beta / lengths[b] / total_weight
        elif loss_type == "teacher_sft":
            total += -w * beta * rho[a]
            grad[a] += -w * beta / lengths[a] / total_weight
        else:  # constant_student_weight
            s = _sigmoid(-m)
            total += -w * beta * (s * rho[a] - constant * rho[b])
            grad[a] += -w * beta * s / lengths[a] / total_weight
            grad[b] += w * beta * constant / lengths[b] / total_weight
    return total / total_weight if total_weight else 0.0, grad, pairs


def _samples(has_teacher=None):
    has_teacher = torch.ones(len(GROUPS), dtype=torch.bool) if has_teacher is None else torch.tensor(has_teacher)
    return Samples.of_rows(
        torch.tensor(GROUPS),
        has_teacher,
        torch.tensor(REWARD_S, dtype=torch.float64),
        torch.tensor(REWARD_T, dtype=torch.float64),
    )


def _run(pairing="matched", pair_labels="role", tie_policy="role", tau=1.0, weighting="uniform", **kw):
    policy = torch.tensor(POLICY_S + POLICY_T, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor(LEN_S + LEN_T) if kw.get("length_normalize") else None
    rho = implicit_log_ratios(policy, torch.tensor(TEACHER_S + TEACHER_T, dtype=torch.float64), lengths)
    samples = _samples(kw.get("has_teacher"))
    pairs = make_pairs(samples, pairing, pair_labels, tie_policy, tau, weighting, kw.get("loss_type", "sigmoid"))
    loss, margins = pbsd_loss(
        rho, pairs, kw.get("beta", 0.5), kw.get("eps", 0.0), kw.get("loss_type", "sigmoid"), reduction="mean"
    )
    loss.backward()
    ref_loss, ref_grad, ref_pairs = reference(pairing, pair_labels, tie_policy, tau, weighting, **kw)
    kept = pairs.weight > 0
    got = sorted(
        zip(
            pairs.first[kept].tolist(),
            pairs.second[kept].tolist(),
            pairs.target[kept].tolist(),
            pairs.weight[kept].tolist(),
            strict=True,
        )
    )
    expected = sorted(pair[:4] for pair in ref_pairs if pair[3] > 0)
    assert [pair[:2] for pair in got] == [pair[:2] for pair in expected]
    assert [v for pair in got for v in pair[2:]] == pytest.approx(
        [v for pair in expected for v in pair[2:]], rel=1e-12
    )
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    assert policy.grad.tolist() == pytest.approx(ref_grad, rel=1e-10, abs=1e-12)
    return loss, margins, pairs


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("pairing", ["matched", "all"])
def test_role_labels(length_normalize, eps, pairing):
    _run(pairing, "role", eps=eps, length_normalize=length_normalize)


@pytest.mark.parametrize("tie_policy", ["role", "drop"])
@pytest.mark.parametrize("pairing", ["matched", "all", "union"])
def test_hard_reward_labels_with_ties_and_unscored_samples(tie_policy, pairing):
    _, _, pairs = _run(pairing, "reward", tie_policy, beta=1.0, eps=0.05)
    assert set(pairs.target[pairs.weight > 0].tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("pairing", ["matched", "all", "union"])
@pytest.mark.parametrize("tau", [0.25, 2.0])
def test_soft_reward_labels(pairing, tau):
    _, _, pairs = _run(pairing, "soft", "drop", tau=tau, length_normalize=True)
    if pairing == "union":  # student-student and teacher-teacher pairs are formed
        samples = _samples()
        assert bool((~samples.is_teacher[pairs.first] & ~samples.is_teacher[pairs.second]).any())
        assert bool((samples.is_teacher[pairs.first] & samples.is_teacher[pairs.second]).any())


@pytest.mark.parametrize("pairing", ["matched", "all"])
@pytest.mark.parametrize("tau", [0.5, 3.0])
def test_tilted_teacher_weights(pairing, tau):
    _, _, pairs = _run(pairing, "role", tau=tau, weighting="tilted", has_teacher=[True, True, True, False] * 2)
    samples = _samples([True, True, True, False] * 2)
    teacher_weights = dict(zip(pairs.first.tolist(), pairs.weight.tolist(), strict=True))
    for group in (0, 1):  # self-normalized: the weights of a prompt's teacher samples average to 1
        members = [a for a in teacher_weights if samples.group[a] == group]
        assert sum(teacher_weights[a] for a in members) == pytest.approx(len(members))


def test_tilted_weights_tend_to_role_labels_as_tau_grows():
    scored = [not math.isnan(r) for r in REWARD_T]  # an unscored teacher sample has weight 0 at any τ
    role_loss, _, _ = _run("all", "role", has_teacher=scored)
    tilted_loss, _, pairs = _run("all", "role", tau=1e9, weighting="tilted", has_teacher=scored)
    assert pairs.weight.tolist() == pytest.approx([1.0] * len(pairs), abs=1e-8)
    assert tilted_loss.item() == pytest.approx(role_loss.item(), rel=1e-8)


@pytest.mark.parametrize("loss_type", ["teacher_sft", "constant_student_weight"])
@pytest.mark.parametrize("pairing", ["matched", "all"])
def test_diagnostic_arms(loss_type, pairing):
    _run(pairing, "role", loss_type=loss_type, beta=0.3)


def test_soft_label_loss_is_minimal_at_the_tilted_margin():
    """With p = σ(Δr/τ) the loss's minimum over the margin is m = Δr/τ: π_θ/π_T ∝ exp(r/(β·τ))."""
    samples = Samples.of_rows(
        torch.tensor([0]), torch.tensor([True]), torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0]).double()
    )  # teacher reward 1, student reward 0
    tau, beta = 0.5, 0.2
    pairs = make_pairs(samples, "matched", "soft", temperature=tau)
    gap = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)  # ρ_teacher − ρ_student
    best = (1.0 / tau) / beta
    for value, sign in ((best, 0), (best - 1.0, -1), (best + 1.0, 1)):
        gap.grad = None
        with torch.no_grad():
            gap.fill_(value)
        loss, _ = pbsd_loss(torch.stack([gap * 0, gap]), pairs, beta)
        loss.backward()
        assert (gap.grad.item() > 1e-9) - (gap.grad.item() < -1e-9) == sign


def test_nan_reward_loses_against_a_number_and_row_labels():
    labels = preference_labels(torch.tensor([float("nan"), 0.0]), torch.tensor([0.0, float("nan")]), "reward")
    assert labels.tolist() == [-1.0, 1.0]
    assert preference_labels(torch.zeros(3), None, "role").tolist() == [1.0] * 3


def test_no_kept_pair_gives_a_differentiable_zero():
    policy = torch.zeros(4, requires_grad=True)
    samples = Samples.of_rows(torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool), torch.ones(2), torch.ones(2))
    pairs = make_pairs(samples, "matched", "reward", "drop")  # every pair a tie
    assert pairs.weight.sum() == 0
    loss, _ = pbsd_loss(policy, pairs, beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and policy.grad.abs().sum() == 0


def test_gradient_matches_method_note_formula():
    """∇ℓ = −β σ(−m) [∇log π_θ(y⁺|x) − ∇log π_θ(y⁻|x)]"""
    samples = Samples.of_rows(torch.tensor([0]), torch.tensor([True]))
    pairs = make_pairs(samples)
    beta = 0.7
    policy = torch.tensor([-4.0, -1.5], dtype=torch.float64, requires_grad=True)  # student sample, teacher sample
    teacher = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    loss, margins = pbsd_loss(implicit_log_ratios(policy, teacher), pairs, beta)
    loss.backward()
    m = beta * ((-1.5 + 3.0) - (-4.0 + 1.0))
    assert margins.item() == pytest.approx(m)
    assert policy.grad.tolist() == pytest.approx([beta * _sigmoid(-m), -beta * _sigmoid(-m)])


def test_loss_saturates_once_pair_is_ordered():
    pairs = make_pairs(Samples.of_rows(torch.tensor([0]), torch.tensor([True])))
    grads = []
    for gap in (0.0, 5.0, 50.0):
        policy = torch.tensor([0.0, gap], requires_grad=True)
        loss, _ = pbsd_loss(policy, pairs, beta=1.0)
        loss.backward()
        grads.append(policy.grad[1].abs().item())
    assert grads[0] > grads[1] > grads[2] and grads[2] < 1e-12


@pytest.mark.parametrize("pairing", ["matched", "all", "union"])
def test_micro_batches_sum_to_the_whole_batch(pairing):
    """A batch split over micro-batches (or processes), each differentiating its rows against a detached partner
    table: the values and the gradients add up to those of the whole batch."""
    labels = "role" if pairing != "union" else "soft"
    samples = _samples([True, True, False, True] * 2)
    pairs = make_pairs(samples, pairing, labels, "role", 0.7)
    policy = torch.tensor(POLICY_S + POLICY_T, dtype=torch.float64, requires_grad=True)
    rho = implicit_log_ratios(policy, torch.tensor(TEACHER_S + TEACHER_T, dtype=torch.float64))
    whole, _ = pbsd_loss(rho, pairs, 0.4, 0.1, reduction="sum")
    (expected,) = torch.autograd.grad(whole, policy)
    table = PairTable(samples, pairs, None if pairing == "matched" else rho.detach())
    total = 0.0
    for rows in ([0, 5, 2], [1, 3], [4, 6, 7]):
        row_index = torch.tensor(rows)
        part, share = table.micro_batch(row_index, rho[row_index], rho[row_index + 8])
        loss, _ = pbsd_loss(part, pairs, 0.4, 0.1, share=share, reduction="sum")
        loss.backward(retain_graph=True)
        total += loss.item()
    assert total == pytest.approx(whole.item(), rel=1e-12)
    assert policy.grad.tolist() == pytest.approx(expected.tolist(), rel=1e-10, abs=1e-12)


def test_matched_table_refuses_pairs_across_micro_batches():
    samples = _samples()
    table = PairTable(samples, make_pairs(samples, "all"))  # cross-row pairs without partner log-ratios
    with pytest.raises(ValueError, match="spans micro-batches"):
        table.micro_batch(torch.tensor([0]), torch.zeros(1), torch.zeros(1))


def test_statistics_leave_out_identical_pairs_and_ties():
    """Identical pairs have margin 0 online and ±1e-5 with pool log-probs: neither counts in the accuracy, so the two
    agree; reward ties are counted apart, and left out of the accuracy where rewards decide the target."""
    ids = torch.tensor([[1, 2, 3], [4, 5, 0], [1, 2, 3], [7, 7, 7]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    student, teacher = sequence_hashes(ids[:2], mask[:2]), sequence_hashes(ids[2:], mask[2:])
    assert student[0] == teacher[0] and student[1] != teacher[1]
    samples = Samples.of_rows(
        torch.tensor([0, 1]),
        torch.ones(2, dtype=torch.bool),
        torch.tensor([1.0, 0.0]),
        torch.tensor([1.0, 1.0]),
        hashes=(student, teacher),
    )
    pairs = make_pairs(samples)  # row 0: identical sequences (and a reward tie), row 1: informative
    accuracies = []
    for identical_margin in (0.0, 1e-5, -1e-5):
        stats = pair_statistics(torch.tensor([identical_margin, 0.3]), pairs, samples)
        total, count = stats["preference_accuracy"]
        accuracies.append(total.item() / count.item())
        assert stats["identical_frac"][0].item() / stats["identical_frac"][1].item() == 0.5
        assert stats["tie_frac"][0].item() / stats["tie_frac"][1].item() == 0.5
    assert accuracies == [1.0, 1.0, 1.0]
    # a margin inside the tolerance is not "ordered"
    stats = pair_statistics(torch.tensor([0.0, ACCURACY_TOLERANCE / 2]), pairs, samples)
    assert stats["preference_accuracy"][0].item() == 0.0


def test_statistics_orient_margins_by_target_and_correlate_weights_with_reward_gaps():
    samples = Samples.of_rows(
        torch.tensor([0, 1, 2]),
        torch.ones(3, dtype=torch.bool),
        torch.tensor([1.0, 0.0, 0.5]),
        torch.tensor([0.0, 1.0, 0.0]),
    )
    pairs = make_pairs(samples, "matched", "reward")  # rows 0 and 2 flipped (student preferred)
    margins = torch.tensor([0.4, 0.2, -0.1])
    stats = pair_statistics(margins, pairs, samples, rewards_decide=True)
    oriented = [-0.4, 0.2, 0.1]
    assert stats["margin"][0].item() == pytest.approx(sum(oriented))
    assert stats["preference_accuracy"][0].item() == 2.0
    x = [_sigmoid(-m) for m in oriented]
    y = [1.0, 1.0, 0.5]  # reward of the preferred sample minus the other's
    sums = {k: stats[f"corr_{k}"][0].item() for k in ("x", "y", "xx", "yy", "xy")}
    expected = torch.corrcoef(torch.tensor([x, y], dtype=torch.float64))[0, 1].item()
    assert pearson_from_sums(sums, stats["corr_x"][1].item()) == pytest.approx(expected, rel=1e-4)
    assert math.isnan(pearson_from_sums({"x": 1, "y": 1, "xx": 1, "yy": 1, "xy": 1}, 1))


def test_kl_regularized_policy_gradient():
    """Pairs of student samples only; summed over a prompt's pairs the gradient of each ρ_j is −G·(R_j − R̄), with
    R = r − β·ρ: a policy gradient on the KL-regularized reward with the group mean as baseline."""
    _, _, pairs = _run("union", "reward", loss_type="kl_regularized_pg", beta=0.3, length_normalize=True)
    samples = _samples()
    assert not bool(samples.is_teacher[pairs.first].any() | samples.is_teacher[pairs.second].any())
    beta = 0.3
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.25], dtype=torch.float64)  # one prompt, four student samples
    samples = Samples.of_rows(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool), rewards, rewards)
    rho = torch.tensor([-1.0, 2.0, 0.5, -0.25, 0, 0, 0, 0], dtype=torch.float64, requires_grad=True)
    pairs = make_pairs(samples, "union", "reward", loss_type="kl_regularized_pg")
    loss, _ = pbsd_loss(rho, pairs, beta, loss_type="kl_regularized_pg", reduction="sum")
    loss.backward()
    regularized = rewards - beta * rho.detach()[:4]
    assert rho.grad[:4].tolist() == pytest.approx((-4 * (regularized - regularized.mean())).tolist(), rel=1e-12)
    assert rho.grad[4:].abs().sum() == 0  # the teacher samples take no part
