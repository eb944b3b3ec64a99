"""
Full-logits reference for `fused_logprob_gap`: obviously correct, memory-hungry (`[B, T, V]` logits), used by the tests
and as the "naive" contender of the benchmark. Computes in the inputs' dtype, so float64 inputs give a float64 oracle.
"""

from __future__ import annotations

import torch


def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """`log_softmax(z / temperature)` at `labels`, 0 where `labels == ignore_index`, with
    `z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)` (no tanh without a cap)."""
    del token_chunk_size, vocab_chunk_size  # same signature as the fused op; nothing is tiled here
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logps = torch.log_softmax(logits / temperature, dim=-1)
    mask = labels != ignore_index
    per_token = logps.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return per_token.masked_fill(~mask, 0)


def reference_logprob_gap(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `fused_logprob_gap`, outputs in the computation dtype (at least float32)."""
    out_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    transform = {"softcap": softcap, "logit_scale": logit_scale}
    student_logps = reference_logprobs(
        student_hidden, lm_head_weight, labels, temperature, ignore_index, bias, **transform
    )
    with torch.no_grad():
        teacher_logps = reference_logprobs(
            teacher_hidden.detach(),
            lm_head_weight.detach(),
            labels,
            temperature,
            ignore_index,
            bias.detach() if bias is not None else None,
            **transform,
        )
    student_logps, teacher_logps = student_logps.to(out_dtype), teacher_logps.to(out_dtype)
    return student_logps, teacher_logps, (student_logps - teacher_logps).sum(dim=-1)
