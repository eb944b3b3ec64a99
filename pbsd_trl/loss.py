r"""The PBSD pairwise loss, written as the equations of the method note.

For a prompt `x` with privileged context `c`, a teacher sample `y⁺ ~ π_T(·|x,c)` and a student sample
`y⁻ ~ π_θ(·|x)`:

    r_θ(x, y) = β · [log π_θ(y|x) − log π_T(y|x,c)]          (implicit reward)
    m_θ       = r_θ(x, y⁺) − r_θ(x, y⁻)                       (margin)
    ℓ         = −(1−ε)·log σ(m_θ) − ε·log σ(−m_θ)             (ε = label smoothing, 0 in the paper)

With `pair_labels="reward"` a pair whose student sample earned more reward is flipped (the student sample becomes
`y⁺`), and a tie is kept in role order or dropped. Everything here works on per-sequence tensors; the trainer
produces them from the model.
"""

import torch
import torch.nn.functional as F


ROLE_LABEL = 1.0  # the teacher sample is preferred
FLIPPED_LABEL = -1.0  # the student sample is preferred
DROPPED_LABEL = 0.0  # the pair does not enter the loss


def implicit_log_ratios(
    policy_logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """`log π_θ(y|x) − log π_T(y|x,c)` per sequence, from sequence log-probs (sums over completion tokens).

    With `lengths` (completion token counts), the difference is length-normalized; empty completions count as 1.
    The implicit reward of the method note is `β` times this.
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
    """Label of each (teacher sample, student sample) pair: `+1` teacher preferred, `-1` student preferred, `0` dropped.

    `"role"` labels every pair `+1` (the rewards may be `None`). `"reward"` compares the rewards; a tie (including two
    NaN rewards, i.e. unscorable samples) follows `tie_policy`. A NaN against a number loses.
    """
    if pair_labels == "role":
        reference = teacher_rewards if teacher_rewards is not None else student_rewards
        if reference is None:
            raise ValueError("preference_labels needs the rewards' shape when both are None.")
        return torch.full_like(reference, ROLE_LABEL, dtype=torch.float32)
    if pair_labels != "reward":
        raise ValueError(f"Unknown pair_labels {pair_labels!r}; expected 'role' or 'reward'.")
    if teacher_rewards is None or student_rewards is None:
        raise ValueError("pair_labels='reward' needs rewards for both the teacher and the student samples.")
    neg_inf = torch.finfo(torch.float32).min
    teacher = torch.nan_to_num(teacher_rewards.float(), nan=neg_inf)
    student = torch.nan_to_num(student_rewards.float(), nan=neg_inf)
    tie_label = ROLE_LABEL if tie_policy == "role" else DROPPED_LABEL
    labels = torch.full_like(teacher, tie_label)
    labels = torch.where(teacher > student, torch.full_like(labels, ROLE_LABEL), labels)
    labels = torch.where(teacher < student, torch.full_like(labels, FLIPPED_LABEL), labels)
    return labels


def pair_margins(
    teacher_log_ratios: torch.Tensor, student_log_ratios: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """`m_θ = β·(log-ratio of y⁺ − log-ratio of y⁻)`: the teacher sample is `y⁺` where `labels` is `+1`."""
    return beta * labels * (teacher_log_ratios - student_log_ratios)


def logistic_preference_loss(margins: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair `−(1−ε)·log σ(m) − ε·log σ(−m)` (DPO's sigmoid loss; conservative DPO when ε > 0)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)


def pbsd_loss(
    teacher_log_ratios: torch.Tensor,
    student_log_ratios: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (or sum) PBSD loss over the pairs that are not dropped, and the margin of every pair.

    Args:
        teacher_log_ratios: `(N_T,)` log-ratios `log π_θ(y|x) − log π_T(y|x,c)` of the teacher samples.
        student_log_ratios: `(N_S,)` the same for the student samples.
        pairs: `(P, 2)` long, each row `(teacher sample index, student sample index)`. `matched` pairing is
            `[[i, i]]`; `all` pairing is every teacher × student index of the same prompt.
        labels: `(P,)` from [`preference_labels`]: `+1`, `-1` or `0` (dropped).
        beta: the preference temperature β.
        label_smoothing: ε.
        reduction: `"mean"` over the kept pairs, or `"sum"` (the trainer divides by the pair count of the whole
            generation batch, which spans micro-batches and processes).

    Returns:
        `(loss, margins)`: the scalar loss over kept pairs (a differentiable `0` when none is kept) and the `(P,)`
        margins, whose sign says whether each pair is ordered as labelled.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Unknown reduction {reduction!r}; expected 'mean' or 'sum'.")
    margins = pair_margins(teacher_log_ratios[pairs[:, 0]], student_log_ratios[pairs[:, 1]], labels, beta)
    kept = (labels != DROPPED_LABEL).to(margins.dtype)
    loss = (logistic_preference_loss(margins, label_smoothing) * kept).sum()
    if reduction == "mean":
        loss = loss / kept.sum().clamp(min=1.0)
    return loss, margins


def matched_pairs(num_rows: int, device: torch.device | None = None) -> torch.Tensor:
    """`(num_rows, 2)` pairs `(i, i)`: the i-th teacher sample with the i-th student sample."""
    index = torch.arange(num_rows, device=device)
    return torch.stack([index, index], dim=1)


def all_pairs(
    teacher_groups: torch.Tensor, student_groups: torch.Tensor, has_teacher: torch.Tensor | None = None
) -> torch.Tensor:
    """Every `(teacher index, student index)` whose samples answer the same prompt (same group id).

    `has_teacher` (bool, like `teacher_groups`) leaves out the teacher rows that carry no sample (with
    `num_teacher_generations` below the group size, only the first rows of each group have one).
    """
    same = teacher_groups.unsqueeze(1) == student_groups.unsqueeze(0)
    if has_teacher is not None:
        same = same & has_teacher.unsqueeze(1)
    return same.nonzero()


def pair_labels_of(
    pairs: torch.Tensor,
    teacher_rewards: torch.Tensor,
    student_rewards: torch.Tensor,
    pair_labels: str = "role",
    tie_policy: str = "role",
) -> torch.Tensor:
    """[`preference_labels`] of each row of `pairs`, from per-sample rewards (NaN where a sample is unscored)."""
    return preference_labels(teacher_rewards[pairs[:, 0]], student_rewards[pairs[:, 1]], pair_labels, tie_policy)
