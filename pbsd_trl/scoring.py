"""Sequence log-probs of completions given their prompts: the one scoring function of the trainer's teacher, its
partner table for pairings across rows, and the teacher-pool build (whose stored log-probs must equal what the trainer
would score online), and the trainer's mixin over it."""

import contextlib

import torch
from accelerate.utils import gather
from trl.models.utils import disable_gradient_checkpointing

from .kernels.shared_prefix import shared_prefix_token_logps, supports_shared_prefix
from .logprobs import concat_prompt_completion, fused_forward_logps, right_pad_to
from .loss import implicit_log_ratios


def completion_token_logps(
    forward, prompt_ids, prompt_mask, completion_ids, completion_mask, *, autocast, batch_size=None
) -> torch.Tensor:
    """Per-token log-probs `(B, C)` float32 of right-padded completions given left-padded prompts (0 on padding):
    `[prompt ; completion]` batches of at most `batch_size` rows, each through `forward(input_ids, attention_mask,
    labels)`, a fused-head forward returning per-token log-probs `(b, S-1)` (`pbsd_logprobs=True`), run inside
    `autocast()`."""
    if completion_ids.size(1) == 0 or prompt_ids.size(0) == 0:
        return completion_ids.new_zeros(completion_ids.shape, dtype=torch.float32)
    batch_size = batch_size or prompt_ids.size(0)
    chunks = []
    for start in range(0, prompt_ids.size(0), batch_size):
        rows = slice(start, start + batch_size)
        input_ids, attention_mask, labels = concat_prompt_completion(
            prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows]
        )
        with autocast():
            logps = forward(input_ids, attention_mask, labels)
        chunks.append(logps[:, -completion_ids.size(1) :])
    return torch.cat(chunks).float()


def sequence_logps(
    model,
    prompt_ids,
    prompt_mask,
    completion_sets,
    *,
    temperature: float,
    autocast=contextlib.nullcontext,
    batch_size=None,
    forward=None,
) -> list[torch.Tensor]:
    """Sums `(B,)` float32 of per-token log-probs at `temperature` of several `(ids, mask, score_mask)` completion
    sets given the same left-padded prompts, over each set's `score_mask` (tool results are attended to but not
    scored), without gradient.

    On a model that [`supports_shared_prefix`] the rows of a prompt group share one prompt forward whose KV cache
    serves all their completions, of every set (`pbsd_trl.kernels.shared_prefix`), at most `2 · batch_size`
    completion rows per forward; else one `[prompt ; completion]` pass per set through `forward` (default:
    [`fused_forward_logps`] on `model`; the trainer passes its wrapped model's patched forward, so that DDP/DeepSpeed
    hooks stay armed). `model` is the unwrapped causal LM (a PEFT model scores with its active adapter state).
    """
    if supports_shared_prefix(model):
        width = max(ids.size(1) for ids, _, _ in completion_sets)
        # padding is masked out: its ids and masks are 0
        ids, mask, scored = (torch.cat([right_pad_to(s[i], width, 0) for s in completion_sets]) for i in range(3))
        per_token = shared_prefix_token_logps(
            model,
            prompt_ids.repeat(len(completion_sets), 1),
            prompt_mask.repeat(len(completion_sets), 1),
            ids,
            mask,
            temperature=temperature,
            max_rows=None if batch_size is None else 2 * batch_size,
            autocast=autocast,
        )
        sums, rows = (per_token * scored).sum(-1), prompt_ids.size(0)
        return [sums[i * rows : (i + 1) * rows] for i in range(len(completion_sets))]
    if forward is None:
        forward = lambda *batch: fused_forward_logps(model, *batch, temperature)  # noqa: E731
    with torch.no_grad():
        per_set = [
            completion_token_logps(
                forward, prompt_ids, prompt_mask, ids, mask, autocast=autocast, batch_size=batch_size
            )
            for ids, mask, _ in completion_sets
        ]
    return [(per_token * scored).sum(-1) for per_token, (_, _, scored) in zip(per_set, completion_sets, strict=True)]


class SequenceScoring:
    """Mixin of [`PBSDTrainer`]; reads the trainer's own attributes."""

    def _teacher_sequence_logps(self, scorer, prompt_ids, prompt_mask, completion_sets, batch_size=None):
        """Teacher log-prob sums of several `(ids, mask, score_mask)` completion sets given the same teacher prompts
        (no gradient): [`sequence_logps`] with pbsd-trl's kernel, else GRPO's scoring, one pass per set."""
        if not self.args.use_fused_logprob_kernel:
            return [
                self._sequence_logps(scorer, prompt_ids, prompt_mask, ids, mask, batch_size, score_mask=scored)
                for ids, mask, scored in completion_sets
            ]
        return sequence_logps(
            self.accelerator.unwrap_model(scorer),
            prompt_ids,
            prompt_mask,
            completion_sets,
            temperature=self.temperature,
            autocast=self.accelerator.autocast,
            batch_size=batch_size,
            forward=_patched_forward(scorer),
        )

    def _sequence_logps(
        self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, batch_size=None, score_mask=None
    ):
        """Sum of per-token log-probs of each completion given its prompt, `(B,)` float32, over `score_mask` (default:
        the completion mask; tool results are attended to but not scored)."""
        per_token = self._completion_token_logps(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, batch_size
        )
        return (per_token * (completion_mask if score_mask is None else score_mask)).sum(-1)

    def _completion_token_logps(
        self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, batch_size=None
    ):
        """Per-token log-probs `(B, C)` of the completion tokens (0 on padding), at the sampling temperature."""
        if completion_ids.size(1) == 0:
            return completion_ids.new_zeros(completion_ids.shape, dtype=torch.float32)
        if not self.args.use_fused_logprob_kernel:
            input_ids, attention_mask, _ = concat_prompt_completion(
                prompt_ids, prompt_mask, completion_ids, completion_mask
            )
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), batch_size=batch_size
            )
            return logps.float() * completion_mask
        return completion_token_logps(
            _patched_forward(model),
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            autocast=self.accelerator.autocast,
            batch_size=batch_size,
        )

    def _partner_log_ratios(self, output, batch) -> torch.Tensor:
        """Every sample's log-ratio `ρ`, detached and gathered (`(2N,)`, the [`Samples`] order), for pairings across
        rows.

        A pair's two samples can sit on different processes or micro-batches. With on-policy updates
        (`num_iterations=1`, one generation batch per optimizer step) the student's weights do not change between
        here and the loss, so partner log-ratios scored now, without gradient, are the partners' values at loss time:
        each process differentiates its own samples against them, which gives the exact gradient of the global loss.
        """
        student_scored, teacher_scored = self._score_masks(
            {**output, "teacher_completion_mask": batch.completion_mask}
        )
        args = self.args
        batch_size = args.per_device_train_batch_size if self.model.training else args.per_device_eval_batch_size
        sets = (
            (output["completion_ids"], output["completion_mask"], student_scored, batch.logps_student_samples),
            (batch.completion_ids, batch.completion_mask, teacher_scored, batch.logps_teacher_samples),
        )
        log_ratios = []
        with torch.no_grad(), disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs):
            for ids, mask, scored, teacher_logps in sets:
                policy_logps = self._sequence_logps(
                    self.model, output["prompt_ids"], output["prompt_mask"], ids, mask, batch_size, score_mask=scored
                )
                lengths = scored.sum(1) if args.length_normalize else None
                log_ratios.append(gather(implicit_log_ratios(policy_logps, teacher_logps, lengths)))
        return torch.cat(log_ratios)


def _patched_forward(model):
    """`forward(input_ids, attention_mask, labels)` through `model`'s patched forward ([`add_pbsd_logprob_head`]),
    called on the (possibly DDP/DeepSpeed-wrapped) model so that its hooks stay armed."""
    return lambda input_ids, attention_mask, labels: model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, pbsd_logprobs=True
    )
