r"""The PBSD loss, written as the equations of the method note.

A prompt `x` with privileged context `c` has teacher samples `y ~ π_T(·|x,c)` and on-policy student samples
`y ~ π_θ(·|x)`. Every function here works on one flat vector of such samples (the student samples of a batch's rows,
then their teacher samples: [`Samples`]), each with its log-ratio

    ρ(y) = log π_θ(y|x) − log π_T(y|x,c)                 (the implicit reward is r_θ = β·ρ)

A pair `(a, b)` of samples of one prompt has a target `p_ab = P(a ≻ b)` and a weight `w_ab ≥ 0`:

    m_ab = β·(ρ_a − ρ_b)                                   (margin)
    ℓ_ab = −p̃·log σ(m_ab) − (1 − p̃)·log σ(−m_ab),       p̃ = (1 − ε)·p_ab + ε·(1 − p_ab)
    L    = Σ w_ab·ℓ_ab / Σ w_ab

(ε is label smoothing, conservative DPO). Which pairs a prompt contributes (`pairing`):

    matched   (i-th teacher sample, i-th student sample)
    all       every (teacher sample, student sample)
    union     every two samples, teacher or student (teacher–student, student–student, teacher–teacher)

Their targets (`pair_labels`), with rewards `r` from the reward functions:

    role      p = 1 with `a` the teacher sample: the paper's Eq. 10. Its fixed point is π_θ = π_T, the target of
              OPSD/SDFT, and the rewards never enter.
    reward    p = 1[r_a > r_b]; a tie follows `tie_policy` ("role": the teacher sample wins a teacher–student tie,
              other ties are dropped; "drop": every tie is dropped). The optimum is π_T restricted to its
              best-reward samples (the τ → 0 limit of "soft").
    soft      p = σ((r_a − r_b)/τ). The optimum margin is m_ab = (r_a − r_b)/τ, so π_θ → π_T·exp(r/(β·τ))/Z: the
              reward-tilted teacher π* of the method note, with temperature β·τ.

An unscored sample (NaN reward) loses against a scored one; two unscored samples are dropped. Their weights
(`teacher_weighting`, role targets):

    uniform   w = 1
    tilted    w = G_T·exp(r_a/τ) / Σ_{a'} exp(r_{a'}/τ), over the teacher samples a' of the prompt: the
              self-normalized importance weights that turn samples of π_T into samples of π* ∝ π_T·exp(r/τ). As
              τ → ∞ every w is 1 (role labels).

Two diagnostic arms (`loss_type`, role targets) name what the logistic loss does:

    teacher_sft               ℓ = −β·ρ_a: gradient −β·∇log π_θ(y⁺|x), SFT on the teacher samples alone
    constant_student_weight   gradient −β·[σ(−m_ab)·∇ρ_a − c̄·∇ρ_b], the student side's per-pair weight σ(−m)
                              replaced by its mean c̄ over the pairs (detached)

and a third optimizes the objective J(π) = E_π[r] − β·KL(π‖π_T) directly, to tell the objective from its estimator:

    kl_regularized_pg         every two student samples of a prompt, ℓ_ab = −sg(R_a − R_b)·(ρ_a − ρ_b) with
                              R = r − β·ρ. Summed over a prompt's pairs, the gradient is −G·Σ_j (R_j − R̄)·∇log π_θ(y_j|x):
                              a policy gradient with the KL-regularized reward R and the group mean as baseline
                              (KL-regularized RL with the teacher as the reference)

The gradient of the logistic loss, −β·(p̃ − σ(m))·(∇ρ_a − ∇ρ_b), raises the student's likelihood of the preferred
sample, lowers that of the other, and vanishes once a pair is ordered as its target says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


ROLE_LABEL = 1.0  # the teacher sample is preferred
FLIPPED_LABEL = -1.0  # the student sample is preferred
DROPPED_LABEL = 0.0  # the pair does not enter the loss

PAIRINGS = ("matched", "all", "union")
PAIR_LABELS = ("role", "reward", "soft")
TEACHER_WEIGHTINGS = ("uniform", "tilted")
LOSS_TYPES = ("sigmoid", "teacher_sft", "constant_student_weight", "kl_regularized_pg")

ACCURACY_TOLERANCE = 1e-4
"""A pair counts as ordered when its margin (in its target's direction) exceeds this: pool log-probs and online
scoring of the same sequence differ by float rounding (about 1e-5), which must not decide the count."""


def implicit_log_ratios(
    policy_logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """`ρ = log π_θ(y|x) − log π_T(y|x,c)` per sequence, from sequence log-probs (sums over completion tokens).

    With `lengths` (completion token counts), the difference is length-normalized; empty completions count as 1.
    """
    log_ratios = policy_logps - teacher_logps
    if lengths is not None:
        log_ratios = log_ratios / lengths.to(log_ratios.dtype).clamp(min=1.0)
    return log_ratios


def preference_labels(
    teacher_rewards: torch.Tensor | None,
    student_rewards: torch.Tensor | None,
    pair_labels: str = "role",
    tie_policy: str = "role",
) -> torch.Tensor:
    """Label of each (teacher sample, student sample) row pair: `+1` teacher preferred, `-1` student preferred, `0`
    dropped.

    `"role"` labels every pair `+1` (the rewards may be `None`); otherwise the rewards decide, a tie (two NaN rewards
    included) follows `tie_policy` and a NaN against a number loses.
    """
    if pair_labels == "role":
        reference = teacher_rewards if teacher_rewards is not None else student_rewards
        if reference is None:
            raise ValueError("preference_labels needs the rewards' shape when both are None.")
        return torch.full_like(reference, ROLE_LABEL, dtype=torch.float32)
    if pair_labels not in PAIR_LABELS:
        raise ValueError(f"Unknown pair_labels {pair_labels!r}; expected one of {list(PAIR_LABELS)}.")
    if teacher_rewards is None or student_rewards is None:
        raise ValueError(f"pair_labels={pair_labels!r} needs rewards for both the teacher and the student samples.")
    neg_inf = torch.finfo(torch.float32).min
    teacher = torch.nan_to_num(teacher_rewards.float(), nan=neg_inf)
    student = torch.nan_to_num(student_rewards.float(), nan=neg_inf)
    tie_label = ROLE_LABEL if tie_policy == "role" else DROPPED_LABEL
    labels = torch.full_like(teacher, tie_label)
    labels = torch.where(teacher > student, torch.full_like(labels, ROLE_LABEL), labels)
    labels = torch.where(teacher < student, torch.full_like(labels, FLIPPED_LABEL), labels)
    return labels


# ---- samples and pairs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Samples:
    """The samples of a batch as one vector: the student samples of rows `0..N-1`, then their teacher samples.

    Attributes:
        group: `(2N,)` prompt id of each sample (samples pair only within a prompt).
        is_teacher: `(2N,)` bool.
        valid: `(2N,)` bool; a teacher row without a teacher sample (`num_teacher_generations` below the group
            size) holds none.
        reward: `(2N,)` float, NaN where unscored (or where no reward function is given).
        sequence_hash: `(2N,)` int64 hash of each completion's tokens, or `None`: equal hashes mark identical
            sequences, whose pair has a margin of exactly 0 and no gradient.
    """

    group: torch.Tensor
    is_teacher: torch.Tensor
    valid: torch.Tensor
    reward: torch.Tensor
    sequence_hash: torch.Tensor | None = None

    @classmethod
    def of_rows(cls, groups, has_teacher, student_rewards=None, teacher_rewards=None, hashes=None) -> Samples:
        """From per-row tensors (`(N,)` each; `hashes` a `(student, teacher)` pair of `(N,)` tensors)."""
        num_rows = groups.numel()
        nan = torch.full((num_rows,), torch.nan, device=groups.device)
        rewards = [
            nan if r is None else r if r.is_floating_point() else r.float() for r in (student_rewards, teacher_rewards)
        ]
        return cls(
            group=groups.repeat(2),
            is_teacher=torch.arange(2 * num_rows, device=groups.device) >= num_rows,
            valid=torch.cat([torch.ones_like(has_teacher, dtype=torch.bool), has_teacher.bool()]),
            reward=torch.cat(rewards),
            sequence_hash=None if hashes is None else torch.cat(list(hashes)),
        )

    @property
    def num_rows(self) -> int:
        return self.group.numel() // 2


@dataclass(frozen=True)
class Pairs:
    """Pairs of samples as indices into a [`Samples`] vector, with `target = P(first ≻ second)` and a weight
    (`0` for a pair that does not enter the loss, such as a dropped tie)."""

    first: torch.Tensor
    second: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    reward_gap: torch.Tensor | None = None  # r_first − r_second (NaN where either is unscored)

    def __len__(self) -> int:
        return self.first.numel()


def candidate_pairs(samples: Samples, pairing: str, students_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(first, second)` indices of the pairs `pairing` forms; a teacher–student pair has its teacher sample first.
    `students_only` keeps the pairs of two student samples."""
    num_rows = samples.num_rows
    device = samples.group.device
    if pairing == "matched":
        rows = samples.valid[num_rows:].nonzero().flatten()
        return rows + num_rows, rows
    if pairing not in ("all", "union"):
        raise ValueError(f"Unknown pairing {pairing!r}; expected one of {list(PAIRINGS)}.")
    same = samples.group.unsqueeze(1) == samples.group.unsqueeze(0)
    same &= samples.valid.unsqueeze(1) & samples.valid.unsqueeze(0)
    if pairing == "all":
        same &= samples.is_teacher.unsqueeze(1) & ~samples.is_teacher.unsqueeze(0)
    else:  # each unordered pair once; teacher samples sit after student samples, so a mixed pair is (teacher, student)
        index = torch.arange(same.size(0), device=device)
        same &= index.unsqueeze(1) > index.unsqueeze(0)
    if students_only:
        same &= ~samples.is_teacher.unsqueeze(1) & ~samples.is_teacher.unsqueeze(0)
    first, second = same.nonzero().unbind(1)
    return first, second


def pair_targets(
    samples: Samples, first, second, pair_labels: str, tie_policy: str = "role", temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(target, kept)` of each pair: `P(first ≻ second)` and whether the pair enters the loss (module docstring)."""
    if pair_labels == "role":
        if not bool((samples.is_teacher[first] & ~samples.is_teacher[second]).all()):
            raise ValueError("pair_labels='role' needs (teacher sample, student sample) pairs.")
        ones = torch.ones(first.shape, device=first.device)
        return ones, ones.bool()
    if pair_labels not in PAIR_LABELS:
        raise ValueError(f"Unknown pair_labels {pair_labels!r}; expected one of {list(PAIR_LABELS)}.")
    reward_a, reward_b = samples.reward[first], samples.reward[second]
    scored_a, scored_b = ~torch.isnan(reward_a), ~torch.isnan(reward_b)
    gap = torch.nan_to_num(reward_a, nan=0.0) - torch.nan_to_num(reward_b, nan=0.0)
    if pair_labels == "soft":
        target = torch.sigmoid(gap / temperature)
        tie = torch.zeros_like(scored_a)  # an equal-reward pair has target 1/2: both samples equally likely under π*
    else:
        target = (gap > 0).float()
        tie = gap == 0
    # an unscored sample loses against a scored one; two unscored ones are a tie
    target = torch.where(scored_a & ~scored_b, torch.ones_like(target), target)
    target = torch.where(~scored_a & scored_b, torch.zeros_like(target), target)
    tie = torch.where(scored_a & scored_b, tie, ~scored_a & ~scored_b)
    teacher_first = samples.is_teacher[first] & ~samples.is_teacher[second]
    if tie_policy == "role":
        target = torch.where(tie & teacher_first, torch.ones_like(target), target)
        kept = ~tie | teacher_first
    else:
        kept = ~tie
    return target, kept


def tilted_teacher_weights(samples: Samples, temperature: float) -> torch.Tensor:
    """`(2N,)` weight of each sample: `G_T·exp(r/τ)/Σ exp(r/τ)` over the valid teacher samples of its prompt for a
    teacher sample (an unscored one counts as `r = −∞`; a prompt with none scored gets uniform weights), `1` for a
    student sample."""
    weights = torch.ones_like(samples.reward)
    teacher = samples.is_teacher & samples.valid
    logits = torch.where(teacher, samples.reward / temperature, torch.full_like(samples.reward, -torch.inf))
    logits = torch.nan_to_num(logits, nan=-torch.inf)
    groups, inverse = torch.unique(samples.group, return_inverse=True)
    num_groups = groups.numel()
    group_max = logits.new_full((num_groups,), -torch.inf).scatter_reduce(0, inverse, logits, "amax")
    none_scored = torch.isinf(group_max[inverse])
    logits = torch.where(none_scored & teacher, torch.zeros_like(logits), logits)
    shifted = torch.exp(logits - torch.where(none_scored, 0.0, group_max[inverse]))
    shifted = torch.where(teacher, shifted, torch.zeros_like(shifted))
    totals = logits.new_zeros(num_groups).index_add(0, inverse, shifted)
    counts = logits.new_zeros(num_groups).index_add(0, inverse, teacher.to(logits.dtype))
    tilted = counts[inverse] * shifted / totals[inverse].clamp(min=torch.finfo(shifted.dtype).tiny)
    return torch.where(teacher, tilted, weights)


def make_pairs(
    samples: Samples,
    pairing: str = "matched",
    pair_labels: str = "role",
    tie_policy: str = "role",
    temperature: float = 1.0,
    teacher_weighting: str = "uniform",
    loss_type: str = "sigmoid",
) -> Pairs:
    """The pairs of a batch, with their targets and weights (module docstring); dropped pairs keep weight `0`.

    `loss_type="kl_regularized_pg"` takes every two scored student samples of a prompt (its targets are unused)."""
    policy_gradient = loss_type == "kl_regularized_pg"
    first, second = candidate_pairs(samples, pairing, students_only=policy_gradient)
    gap = samples.reward[first] - samples.reward[second]
    if policy_gradient:  # the target only orients the pair statistics: by reward, a tie at 1/2
        target = torch.where(gap > 0, 1.0, torch.where(gap < 0, 0.0, 0.5)).to(gap.dtype)
        return Pairs(first, second, target, (~torch.isnan(gap)).to(gap.dtype), gap)
    target, kept = pair_targets(samples, first, second, pair_labels, tie_policy, temperature)
    weight = kept.to(gap.dtype)
    if teacher_weighting == "tilted":
        weight = weight * tilted_teacher_weights(samples, temperature)[first]
    elif teacher_weighting != "uniform":
        raise ValueError(f"Unknown teacher_weighting {teacher_weighting!r}; expected {list(TEACHER_WEIGHTINGS)}.")
    return Pairs(first, second, target, weight, gap)


def sequence_hashes(completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """`(N,)` int64 hash of each completion's tokens (equal for identical sequences, on every process)."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask, strict=True)]
    return torch.tensor([hash(tuple(row)) for row in rows], dtype=torch.int64, device=completion_ids.device)


@dataclass(frozen=True)
class PairTable:
    """A generation batch's samples and pairs, gathered over processes; for pairings across rows, also every
    sample's log-ratio `ρ`, detached (scored once at generation: exact while no update happens before the loss)."""

    samples: Samples
    pairs: Pairs
    log_ratios: torch.Tensor | None = None

    @classmethod
    def of_matched_rows(cls, has_teacher, target, weight, rewards, hashes) -> PairTable:
        """The matched pairs of a micro-batch from its rows alone (`(n,)` target and weight of each row's pair, `(n, 2)`
        student and teacher rewards and sequence hashes): a matched pair never leaves its row."""
        num_rows = has_teacher.numel()
        samples = Samples.of_rows(
            torch.arange(num_rows, device=has_teacher.device),
            has_teacher,
            rewards[:, 0],
            rewards[:, 1],
            hashes=(hashes[:, 0], hashes[:, 1]),
        )
        rows = has_teacher.nonzero().flatten()
        return cls(samples, Pairs(rows + num_rows, rows, target[rows], weight[rows]))

    def matched_row_values(self, row_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-row values that [`of_matched_rows`] takes back, for the global rows `row_index`."""
        num_rows = self.samples.num_rows
        target = torch.zeros(num_rows, device=self.pairs.target.device, dtype=self.pairs.target.dtype)
        weight = torch.zeros(num_rows, device=self.pairs.weight.device, dtype=self.pairs.weight.dtype)
        target[self.pairs.second], weight[self.pairs.second] = self.pairs.target, self.pairs.weight
        pair = torch.stack([row_index, row_index + num_rows], 1)
        return {
            "target": target[row_index],
            "weight": weight[row_index],
            "rewards": self.samples.reward[pair],
            "hashes": self.samples.sequence_hash[pair],
        }

    def micro_batch(
        self, row_index: torch.Tensor, student_log_ratios: torch.Tensor, teacher_log_ratios: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(ρ, share)` for [`pbsd_loss`] on the rows `row_index` (global row ids): the table's `ρ` with this
        micro-batch's samples replaced by their live (differentiable) log-ratios, and each pair's share."""
        num_rows = self.samples.num_rows
        index = torch.cat([row_index, row_index + num_rows])
        live = torch.cat([student_log_ratios, teacher_log_ratios])
        table = self.log_ratios if self.log_ratios is not None else live.new_zeros(2 * num_rows)
        log_ratios = table.detach().to(live.dtype).index_put((index,), live)
        here = torch.zeros(2 * num_rows, dtype=live.dtype, device=live.device).index_fill(0, index, 1.0)
        share = (here[self.pairs.first] + here[self.pairs.second]) / 2
        if self.log_ratios is None and bool(((share > 0) & (share < 1)).any()):
            raise ValueError("A pair spans micro-batches, but the table holds no partner log-ratios to pair against.")
        return log_ratios, share


# ---- the loss ---------------------------------------------------------------------------------------------------
def logistic_preference_loss(margins: torch.Tensor, target=1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair `−p̃·log σ(m) − (1−p̃)·log σ(−m)`, `p̃ = (1−ε)·p + ε·(1−p)` (DPO's sigmoid loss, soft targets)."""
    target = torch.as_tensor(target, dtype=margins.dtype, device=margins.device)
    target = (1.0 - label_smoothing) * target + label_smoothing * (1.0 - target)
    return -target * F.logsigmoid(margins) - (1.0 - target) * F.logsigmoid(-margins)


def pair_losses(
    log_ratios: torch.Tensor, pairs: Pairs, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ℓ, m)` per pair from the samples' log-ratios `ρ` (module docstring; the diagnostic arms give surrogates
    whose gradient, not value, is the stated one)."""
    rho_first, rho_second = log_ratios[pairs.first], log_ratios[pairs.second]
    margins = beta * (rho_first - rho_second)
    if loss_type == "sigmoid":
        return logistic_preference_loss(margins, pairs.target, label_smoothing), margins
    if loss_type == "teacher_sft":
        return -beta * rho_first, margins
    if loss_type == "kl_regularized_pg":
        regularized_gap = torch.nan_to_num(pairs.reward_gap.to(margins.dtype), nan=0.0) - margins
        return -regularized_gap.detach() * margins / beta, margins
    if loss_type == "constant_student_weight":
        weight = torch.sigmoid(-margins).detach()
        kept = pairs.weight > 0
        constant = weight[kept].mean() if bool(kept.any()) else weight.new_zeros(())
        return -beta * (weight * rho_first - constant * rho_second), margins
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {list(LOSS_TYPES)}.")


def pbsd_loss(
    log_ratios: torch.Tensor,
    pairs: Pairs,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    share: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PBSD loss `Σ w·ℓ / Σ w` (or `Σ w·ℓ`) over `pairs`, and the margin of every pair.

    Args:
        log_ratios: `(2N,)` `ρ` of every sample of the [`Samples`] vector the pairs index.
        pairs: from [`make_pairs`].
        beta: the preference temperature β.
        label_smoothing: ε.
        loss_type: `"sigmoid"` (the PBSD loss) or a diagnostic arm.
        share: `(P,)` the share of each pair's value this call owns, when the batch's samples are split over
            micro-batches and processes: a call differentiates its own samples, with their partners' log-ratios
            detached, so a pair with one sample here has share 1/2 and one with both samples here share 1. The
            gradient is that of every pair with a sample here; the value counts each pair by its share, so that
            summed over the calls both are those of the whole batch. `None`: every pair is wholly here.
        reduction: `"mean"` divides by `Σ w` over the pairs with a share; `"sum"` does not (the trainer divides by
            the weight of the whole generation batch, which spans micro-batches and processes).

    Returns:
        `(loss, margins)`: the scalar loss (a differentiable `0` when no pair has weight) and the `(P,)` margins
        `m = β·(ρ_first − ρ_second)`.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Unknown reduction {reduction!r}; expected 'mean' or 'sum'.")
    losses, margins = pair_losses(log_ratios, pairs, beta, label_smoothing, loss_type)
    weighted = pairs.weight.to(losses.dtype) * losses
    if share is None:
        loss, total_weight = weighted.sum(), pairs.weight.sum()
    else:
        touched = (share > 0).to(losses.dtype)
        loss = (weighted * touched).sum() + (weighted * (share - touched)).detach().sum()
        total_weight = (pairs.weight * share).sum()
    if reduction == "mean":
        loss = loss / total_weight.to(loss.dtype).clamp(min=torch.finfo(loss.dtype).tiny)
    return loss, margins


# ---- what the loss did ------------------------------------------------------------------------------------------
def pair_statistics(
    margins: torch.Tensor,
    pairs: Pairs,
    samples: Samples,
    share: torch.Tensor | None = None,
    rewards_decide: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{metric: (sum, count)}` over the pairs (each counted by its `share`), for a global mean by summing both.

    - `margin`: the margin in the target's direction, over the pairs that enter the loss;
    - `identical_frac`: pairs of two identical sequences (margin exactly 0, no gradient), over all pairs formed;
    - `tie_frac`: pairs of two samples with the same reward, over all pairs formed whose samples are both scored;
    - `preference_accuracy`: pairs ordered as their target says, by more than `ACCURACY_TOLERANCE`, over the
      informative pairs only: not identical and, when rewards decide the target (`rewards_decide`), not tied;
    - `weight_reward_corr` (as the six sums of a Pearson correlation): between a pair's gradient weight σ(−m) in the
      target's direction and the reward gap of its preferred sample over the other.
    """
    share = torch.ones_like(margins) if share is None else share.to(margins.dtype)
    margins = margins.detach()
    kept = (pairs.weight > 0).to(margins.dtype) * share
    direction = torch.where(pairs.target >= 0.5, 1.0, -1.0).to(margins.dtype)
    oriented = margins * direction
    if samples.sequence_hash is not None:
        identical = samples.sequence_hash[pairs.first] == samples.sequence_hash[pairs.second]
    else:
        identical = torch.zeros_like(kept, dtype=torch.bool)
    reward_first, reward_second = samples.reward[pairs.first], samples.reward[pairs.second]
    scored = ~(torch.isnan(reward_first) | torch.isnan(reward_second))
    tie = scored & (reward_first == reward_second)
    soft_tie = pairs.target == 0.5
    informative = kept * (~identical).to(kept.dtype)
    if rewards_decide:
        informative = informative * (~(tie | soft_tie)).to(kept.dtype)
    scored_kept = kept * scored.to(kept.dtype)
    scored_formed = share * scored.to(share.dtype)
    x = torch.sigmoid(-oriented)
    y = torch.nan_to_num((reward_first - reward_second) * direction, nan=0.0)

    def total(values, mask):
        return (values.to(margins.dtype) * mask).sum(), mask.sum()

    stats = {
        "margin": total(oriented, kept),
        "identical_frac": total(identical, share),
        "tie_frac": total(tie, scored_formed),
        "preference_accuracy": total(oriented > ACCURACY_TOLERANCE, informative),
    }
    for name, values in {"x": x, "y": y, "xx": x * x, "yy": y * y, "xy": x * y}.items():
        stats[f"corr_{name}"] = total(values, scored_kept)
    return stats


def pearson_from_sums(sums: dict[str, float], count: float) -> float:
    """Pearson correlation from the sums `x, y, xx, yy, xy` over `count` items; NaN when a variance is 0."""
    if count < 2:
        return float("nan")
    mean_x, mean_y = sums["x"] / count, sums["y"] / count
    cov = sums["xy"] / count - mean_x * mean_y
    var_x = sums["xx"] / count - mean_x**2
    var_y = sums["yy"] / count - mean_y**2
    if var_x <= 1e-12 or var_y <= 1e-12:
        return float("nan")
    return cov / (var_x * var_y) ** 0.5
