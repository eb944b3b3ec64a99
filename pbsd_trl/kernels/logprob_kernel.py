"""
Fused student/teacher per-token log-probabilities through a shared LM head, and their per-sequence gap.

PBSD scores the same completion tokens twice through the same LM head: once from the student prompt (with gradient)
and once from the teacher prompt (without). Materializing `[B*T, V]` logits for both costs several GB at V=151936, so
`fused_logprob_gap` streams `[tokens x vocab]` tiles through an online log-sum-exp in fp32, scoring the student and the
teacher rows with one GEMM per tile, and recomputes the student tiles in the backward.

The backward uses that, for `z = (h @ W.T + b) / T` and `logp = z_y - logsumexp(z)`, the gradient of the loss with
respect to the logits of a row with upstream gradient `g` is `c * (onehot(y) - p)` with `c = g / T`. Writing
`E = |c| * p = exp(z - logsumexp(z) + log|c|)`, the only per-tile work is one subtraction and one exponential in place;
the sign of `c` is folded into the small `[tokens, H]` operands, and the one-hot part is a gather/scatter of `H`-sized
rows done once, outside the tiles.

Heads that scale or soft-cap their logits (Gemma-2's `final_logit_softcapping`, Cohere's `logit_scale`) are modeled
as TRL's fused head models them: `z = cap * tanh(s * (h @ W.T + b) / cap) / T`. The scale folds into the GEMM's
`alpha`; the cap adds a `tanh` per tile in the forward and a `1 - tanh²` factor on each logit's gradient.

Plain PyTorch, so it runs wherever PyTorch runs; only the positions whose label is not `ignore_index` are scored.
"""

from __future__ import annotations

import torch


# CPU defaults from `benchmarks/bench_logprob_kernel.py --sweep-only` (table in `benchmarks/results/logprob_kernel.md`):
# every tile from 256 x 512 to 2048 x 8192 ran within the host's noise, because the GEMMs dominate once each is a few
# hundred rows wide. 2048 x 2048 had the best median; its 16 MiB fp32 tile still fits a 32 MiB last-level cache
# between the GEMM that writes it and the element-wise passes that read it, and it keeps the scratch memory fixed.
TOKEN_CHUNK_SIZE = 2048
VOCAB_CHUNK_SIZE = 2048
# On CUDA the element-wise passes are bandwidth-bound kernels and the GEMMs want to be big; TRL's Triton kernel uses
# the same 4096 x 32768 shape.
CUDA_TOKEN_CHUNK_SIZE = 4096
CUDA_VOCAB_CHUNK_SIZE = 32768
# `torch.addmm(..., out_dtype=torch.float32)` from bf16/fp16 inputs, CUDA only
_MM_OUT_DTYPE = torch.__version__ >= "2.8"


def _default_chunks(device: torch.device) -> tuple[int, int]:
    if device.type == "cpu":
        return TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE
    return CUDA_TOKEN_CHUNK_SIZE, CUDA_VOCAB_CHUNK_SIZE


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # CPU GEMMs in bf16/fp16 are slower than in fp32 on most hosts (no native low-precision FMA) and would round the
    # logits before the log-sum-exp; on accelerators the low-precision GEMM is the point
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics and accumulators: fp32, or fp64 for fp64 inputs (gradcheck and oracles)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` for an fp32/fp64 `acc`, without rounding the product to the inputs' dtype first."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _MM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _head_transform(temperature: float, logit_scale: float, softcap: float | None) -> tuple[float, float | None]:
    """`(alpha, post)` with `z = alpha * (h @ W.T + b)` without a cap, `z = post * tanh(alpha * (h @ W.T + b))` with."""
    if softcap is None:
        return logit_scale / temperature, None
    return logit_scale / softcap, softcap / temperature


def _logits_tile(
    tile: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, scaled_bias: torch.Tensor | None, inv_t: float
) -> torch.Tensor:
    """Writes `(rows @ w.T + bias) * inv_t` into the fp32 `tile`, in the GEMM itself where the dtypes allow it (`inv_t`
    is the transform's `alpha`; a soft-cap's `tanh` is applied by the caller)."""
    if rows.dtype == tile.dtype:
        if scaled_bias is None:
            # beta=0 ignores the stale tile contents (NaN/inf included) and saves a separate scaling pass
            torch.addmm(tile, rows, w.t(), beta=0, alpha=inv_t, out=tile)
        else:
            torch.addmm(scaled_bias, rows, w.t(), alpha=inv_t, out=tile)
        return tile
    # Low-precision GEMM (accelerators): accumulate into the fp32 tile so the statistics never see rounded logits
    tile.zero_()
    _addmm_acc(tile, rows, w.t())
    tile.mul_(inv_t)
    if scaled_bias is not None:
        tile.add_(scaled_bias)
    return tile


def _target_logits(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_t: float,
    chunk: int,
    post: float | None = None,
) -> torch.Tensor:
    # One `H`-long dot product per row instead of a gather from every vocabulary tile
    dtype = _stat_dtype(rows.dtype)
    out = torch.empty(rows.shape[0], device=rows.device, dtype=dtype)
    for start in range(0, rows.shape[0], chunk):
        end = min(start + chunk, rows.shape[0])
        w_rows = weight[targets[start:end]].to(dtype)
        torch.sum(w_rows.mul_(rows[start:end]), dim=-1, out=out[start:end])
    out.mul_(inv_t)
    if bias is not None:
        out.add_(bias[targets].to(dtype), alpha=inv_t)
    if post is not None:
        out.tanh_().mul_(post)
    return out


def _log_normalizers(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inv_t: float,
    token_chunk: int,
    vocab_chunk: int,
    post: float | None = None,
) -> torch.Tensor:
    """`logsumexp(z, dim=-1)` of the transformed logits in fp32, one `[token_chunk, vocab_chunk]` tile at a time."""
    n, vocab = rows.shape[0], weight.shape[0]
    device = rows.device
    compute_dtype = rows.dtype
    dtype = _stat_dtype(compute_dtype)
    running_max = torch.full((n,), float("-inf"), device=device, dtype=dtype)
    sum_exp = torch.zeros(n, device=device, dtype=dtype)
    tile_buf = torch.empty(min(n, token_chunk) * min(vocab, vocab_chunk), device=device, dtype=dtype)
    # Vocabulary tiles outside: each slice of the head is read (and cast) once, and the hidden rows are small
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        w = weight[v0:v1].to(compute_dtype)
        scaled_bias = bias[v0:v1].to(dtype).mul(inv_t) if bias is not None else None
        for r0 in range(0, n, token_chunk):
            r1 = min(r0 + token_chunk, n)
            tile = tile_buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
            tile = _logits_tile(tile, rows[r0:r1], w, scaled_bias, inv_t)
            if post is not None:
                tile.tanh_().mul_(post)
            m = running_max[r0:r1]
            new_m = torch.maximum(m, tile.amax(dim=1))
            # The first tile rescales from m=-inf: exp(-inf) = 0 wipes the (zero) sum, as it should
            sum_exp[r0:r1].mul_(torch.exp(m - new_m)).add_(tile.sub_(new_m.unsqueeze(1)).exp_().sum(dim=1))
            m.copy_(new_m)
    return running_max.add_(sum_exp.log_())


class FusedLogProbGapFunction(torch.autograd.Function):
    """
    Student and (optional) teacher per-token log-probabilities through one LM head, and the per-sequence gap
    `sum_t (student_logps - teacher_logps)`; see `fused_logprob_gap` for the arguments. Only the student path, the head
    weight and the bias get gradients.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,  # [B, T, H]
        teacher_hidden: torch.Tensor | None,  # [B, T, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        labels: torch.Tensor,  # [B, T]
        temperature: float,
        ignore_index: int,
        token_chunk_size: int,
        vocab_chunk_size: int,
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Callers often use only one of the outputs; without this, autograd would feed zeros for the others
        ctx.set_materialize_grads(False)
        B, T, H = student_hidden.shape
        device = student_hidden.device
        inv_t, post = _head_transform(temperature, logit_scale, softcap)
        flat_labels = labels.reshape(-1)
        valid = (flat_labels != ignore_index).nonzero().squeeze(1)
        targets = flat_labels[valid]
        n_valid = valid.numel()
        compute_dtype = _compute_dtype(student_hidden.dtype, device)

        # Compacting the scored rows first skips the padding entirely, instead of scoring it and masking afterwards
        rows = student_hidden.detach().reshape(-1, H)[valid]
        if teacher_hidden is not None:
            # One GEMM per tile for both paths: the head tile is streamed from memory once for the two prompts
            rows = torch.cat([rows, teacher_hidden.detach().reshape(-1, H)[valid]])
            targets2 = torch.cat([targets, targets])
        else:
            targets2 = targets
        rows = rows.to(compute_dtype)
        with torch.no_grad():
            logps = _target_logits(rows, weight, bias, targets2, inv_t, token_chunk_size, post)
            if n_valid > 0:
                log_z = _log_normalizers(rows, weight, bias, inv_t, token_chunk_size, vocab_chunk_size, post)
                logps.sub_(log_z)
            else:
                log_z = logps
        del rows

        student_logps = logps.new_zeros(B * T)
        student_logps[valid] = logps[:n_valid]
        teacher_logps = logps.new_zeros(B * T)
        if teacher_hidden is not None:
            teacher_logps[valid] = logps[n_valid:]
        student_logps = student_logps.view(B, T)
        teacher_logps = teacher_logps.view(B, T)
        # Ignored positions are exactly 0 in both, so a plain row sum is the sum over scored positions
        gap = (student_logps - teacher_logps).sum(dim=1)

        ctx.mark_non_differentiable(teacher_logps)
        # The student log-normalizers are kept, so the backward recomputes the tiles but not the statistics
        ctx.save_for_backward(student_hidden, weight, bias, valid, targets, log_z[:n_valid].clone())
        ctx.transform = (temperature, logit_scale, softcap)
        ctx.chunks = (token_chunk_size, vocab_chunk_size)
        return student_logps, teacher_logps, gap

    @staticmethod
    def backward(ctx, grad_student_logps, grad_teacher_logps, grad_gap):  # type: ignore[override]
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        # The backward recomputes the logit tiles: under ZeRO-3 the head must be gathered again here
        weight, bias = ctx.saved_tensors[1:3]
        with maybe_gather_lm_head_ctx(weight, bias):
            return FusedLogProbGapFunction._backward(ctx, grad_student_logps, grad_gap)

    @staticmethod
    def _backward(ctx, grad_student_logps, grad_gap):
        student_hidden, weight, bias, valid, targets, log_z = ctx.saved_tensors
        needs_hidden, _, needs_weight, needs_bias = ctx.needs_input_grad[:4]
        token_chunk, vocab_chunk = ctx.chunks
        inv_t, post = _head_transform(*ctx.transform)
        # d z / d raw logit: `alpha` without a cap, `alpha * post * (1 - tanh²)` with one
        slope = inv_t if post is None else inv_t * post
        B, T, H = student_hidden.shape
        n_valid, vocab = valid.numel(), weight.shape[0]
        device = student_hidden.device
        compute_dtype = _compute_dtype(student_hidden.dtype, device)
        dtype = log_z.dtype

        # d loss / d raw logits = c * (onehot - p) * (1 - tanh²), c = g * slope; the tiles hold E = |c| * p * (1 - tanh²)
        c = _upstream_token_grad(grad_student_logps, grad_gap, valid, T, dtype).mul_(slope)
        shift = log_z - c.abs().log()  # c = 0 gives +inf, hence E = 0 for that row
        neg_sign = -c.sign()

        rows = student_hidden.detach().reshape(-1, H)[valid].to(compute_dtype)
        # The one-hot part: c times the target logit's own cap slope
        c_target = c
        if post is not None and n_valid > 0:
            target_tanh = _target_logits(rows, weight, bias, targets, inv_t, token_chunk, post).div_(post)
            c_target = c * (1 - target_tanh.square())
        grad_rows = torch.zeros(n_valid, H, device=device, dtype=dtype) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        # The head gradient takes -sign(c) through the (small) hidden operand rather than through the tile
        signed_rows = rows * neg_sign.to(compute_dtype).unsqueeze(1) if needs_weight else None
        # One-hot part of the head gradient: c * h scattered into the target rows, added per vocabulary tile in fp32
        onehot_rows = rows.to(dtype, copy=True).mul_(c_target.unsqueeze(1)) if needs_weight else None

        tile_numel = min(max(n_valid, 1), token_chunk) * min(vocab, vocab_chunk)
        tile_buf = torch.empty(tile_numel, device=device, dtype=dtype)
        # Low-precision GEMMs read E from a tile of their own dtype, written by the exp itself (one pass, one cast)
        low_buf = torch.empty(tile_numel, device=device, dtype=compute_dtype) if compute_dtype != dtype else None
        if post is not None and low_buf is None:
            low_buf = torch.empty(tile_numel, device=device, dtype=dtype)  # E, while the tile holds 1 - tanh²
        fp32_weight_grad = grad_weight is not None and grad_weight.dtype == dtype
        for v0 in range(0, vocab, vocab_chunk) if n_valid > 0 else ():
            v1 = min(v0 + vocab_chunk, vocab)
            w = weight[v0:v1].to(compute_dtype)
            scaled_bias = bias[v0:v1].to(dtype).mul(inv_t) if bias is not None else None
            if grad_weight is not None:
                # A low-precision head accumulates each slice in fp32 and rounds it once
                acc_w = grad_weight[v0:v1] if fp32_weight_grad else torch.zeros(v1 - v0, H, device=device, dtype=dtype)
                in_slice = ((targets >= v0) & (targets < v1)).nonzero().squeeze(1)
                acc_w.index_add_(0, targets[in_slice] - v0, onehot_rows[in_slice])
            if grad_bias is not None:
                acc_b = torch.zeros(v1 - v0, device=device, dtype=dtype)
            for r0 in range(0, n_valid, token_chunk):
                r1 = min(r0 + token_chunk, n_valid)
                tile = _logits_tile(
                    tile_buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0), rows[r0:r1], w, scaled_bias, inv_t
                )
                e = _scaled_probabilities(tile, shift[r0:r1], post, low_buf)
                if grad_rows is not None:
                    _addmm_acc(grad_rows[r0:r1], e, w)
                if grad_weight is not None:
                    _addmm_acc(acc_w, e.t(), signed_rows[r0:r1])
                if grad_bias is not None:
                    acc_b.addmv_(e.t().to(dtype), neg_sign[r0:r1])
            if grad_weight is not None and not fp32_weight_grad:
                grad_weight[v0:v1].copy_(acc_w)
            if grad_bias is not None:
                grad_bias[v0:v1].add_(acc_b)
        if grad_bias is not None and n_valid > 0:
            grad_bias.index_add_(0, targets, c_target.to(grad_bias.dtype))

        grad_hidden = None
        if grad_rows is not None:
            # grad_h = c * W[y] - sign(c) * sum_v E_v W_v
            grad_rows.mul_(neg_sign.unsqueeze(1)).add_(weight[targets].to(dtype).mul_(c_target.unsqueeze(1)))
            grad_hidden = torch.zeros(B * T, H, device=device, dtype=student_hidden.dtype)
            grad_hidden.index_copy_(0, valid, grad_rows.to(student_hidden.dtype))
            grad_hidden = grad_hidden.view(B, T, H)
        return grad_hidden, None, grad_weight, grad_bias, None, None, None, None, None, None, None


def _upstream_token_grad(grad_student_logps, grad_gap, valid, seq_len, dtype) -> torch.Tensor:
    """Upstream gradient of each scored token: its own, plus its sequence's gap gradient."""
    g = torch.zeros(valid.numel(), device=valid.device, dtype=dtype)
    if grad_student_logps is not None:
        g += grad_student_logps.reshape(-1)[valid]
    if grad_gap is not None:
        g += grad_gap[torch.div(valid, seq_len, rounding_mode="floor")]
    return g


def _scaled_probabilities(tile, shift, post, low_buf):
    """`E = exp(z - shift)` of a tile of raw logits (times `1 - tanh²` with a logit cap), in place where it can be;
    `shift = log Z - log|c|` folds each row's upstream scale into the softmax."""
    if post is None:
        tile.sub_(shift.unsqueeze(1))
        if low_buf is None:
            return tile.exp_()
        return torch.exp(tile, out=low_buf[: tile.numel()].view(tile.shape))
    t = tile.tanh_()
    e = low_buf[: tile.numel()].view(tile.shape)
    if e.dtype == t.dtype:
        torch.mul(t, post, out=e).sub_(shift.unsqueeze(1)).exp_()
    else:  # exponentiate in fp32, round once
        torch.exp(t.mul(post).sub_(shift.unsqueeze(1)), out=e)
    return e.mul_(t.square_().neg_().add_(1))


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"`{name}` must be [B, T, H] and `labels` [B, T], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"`lm_head_weight` must be [V, {hidden.shape[2]}], got {tuple(weight.shape)}")


def _resolve_chunks(
    device: torch.device, token_chunk_size: int | None, vocab_chunk_size: int | None
) -> tuple[int, int]:
    default_tokens, default_vocab = _default_chunks(device)
    token_chunk_size = token_chunk_size or default_tokens
    vocab_chunk_size = vocab_chunk_size or default_vocab
    if token_chunk_size < 1 or vocab_chunk_size < 1:
        raise ValueError("`token_chunk_size` and `vocab_chunk_size` must be positive")
    return token_chunk_size, vocab_chunk_size


def fused_logprob_gap(
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
    """
    Per-token log-probabilities of the same labels under the student and the teacher hidden states, through one LM
    head, and the per-sequence gap, without materializing the `[B*T, V]` logits.

    Args:
        student_hidden (`torch.Tensor`): `[B, T, H]` final hidden states of the student prompt's completion tokens.
        teacher_hidden (`torch.Tensor`): `[B, T, H]` the teacher's, aligned on the same completion tokens. Never gets
            a gradient.
        lm_head_weight (`torch.Tensor`): `[V, H]` LM head (possibly tied to the input embeddings). Gets the student
            path's gradient only.
        labels (`torch.Tensor`): `[B, T]` token predicted from each position (already shifted).
        temperature (`float`): log-probabilities are `log_softmax(logits / temperature)`.
        ignore_index (`int`): label of the positions that are not scored.
        bias (`torch.Tensor`, *optional*): `[V]` LM head bias. Gets the student path's gradient only.
        token_chunk_size, vocab_chunk_size (`int`, *optional*): tile shape; the defaults depend on the device.
        softcap (`float`, *optional*): final-logit soft-cap (Gemma-2's `final_logit_softcapping`): the logits are
            `softcap * tanh(logits / softcap)` before the temperature. `None` or 0 means no cap.
        logit_scale (`float`, *optional*, defaults to `1.0`): multiplier of the head's logits, before the cap.

    Returns:
        `(student_logps, teacher_logps, gap)`: two `[B, T]` fp32 tensors (fp64 for fp64 inputs), exactly 0 at ignored
        positions, and the `[B]` `sum_t (student_logps - teacher_logps)`. `student_logps` and `gap` are differentiable
        with respect to the student path, the head weight and the bias; `teacher_logps` is not differentiable.
    """
    _check_inputs(student_hidden, lm_head_weight, labels, "student_hidden")
    _check_inputs(teacher_hidden, lm_head_weight, labels, "teacher_hidden")
    chunks = _resolve_chunks(student_hidden.device, token_chunk_size, vocab_chunk_size)
    return FusedLogProbGapFunction.apply(
        student_hidden,
        teacher_hidden,
        lm_head_weight,
        bias,
        labels,
        temperature,
        ignore_index,
        *chunks,
        float(logit_scale),
        softcap or None,
    )


def fused_logprobs(
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
    """
    `[B, T]` fp32 `log_softmax((hidden @ weight.T + bias) / temperature)` gathered at `labels`, 0 where `labels ==
    ignore_index`, differentiable with respect to `hidden`, `weight` and `bias`; single-path `fused_logprob_gap`
    (`softcap` and `logit_scale` as there).
    """
    _check_inputs(hidden, weight, labels, "hidden")
    chunks = _resolve_chunks(hidden.device, token_chunk_size, vocab_chunk_size)
    logps, _, _ = FusedLogProbGapFunction.apply(
        hidden, None, weight, bias, labels, temperature, ignore_index, *chunks, float(logit_scale), softcap or None
    )
    return logps
