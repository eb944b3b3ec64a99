"""Mixin for [`PBSDTrainer`]: sequence log-probs of completions given their prompts, for the teacher (no
gradient) and for the partner table of pairings across rows."""

import torch
from accelerate.utils import gather
from trl.models.utils import disable_gradient_checkpointing

from .kernels.shared_prefix import shared_prefix_token_logps, supports_shared_prefix
from .logprobs import (
    concat_prompt_completion,
    right_pad_to,
)
from .loss import (
    implicit_log_ratios,
)


class SequenceScoring:
    """Mixin of [`PBSDTrainer`]; reads the trainer's own attributes."""

    def _teacher_sequence_logps(self, scorer, prompt_ids, prompt_mask, completion_sets, batch_size=None):
        """Teacher log-prob sums of several `(ids, mask, score_mask)` completion sets given the same teacher prompts
        (no gradient).

        With pbsd-trl's kernel on a supported model, the rows of a prompt group share one teacher-prompt forward
        whose KV cache serves all their completions, of every set (`pbsd_trl.kernels.shared_prefix`); else one
        `[prompt ; completion]` pass per set.
        """
        model = self.accelerator.unwrap_model(scorer)
        if not (self.args.use_fused_logprob_kernel and supports_shared_prefix(model)):
            return [
                self._sequence_logps(scorer, prompt_ids, prompt_mask, ids, mask, batch_size, score_mask=scored)
                for ids, mask, scored in completion_sets
            ]
        width = max(ids.size(1) for ids, _, _ in completion_sets)
        pad_id = self._tokenizer.pad_token_id
        ids = torch.cat([right_pad_to(ids, width, pad_id) for ids, _, _ in completion_sets])
        mask = torch.cat([right_pad_to(mask, width, 0) for _, mask, _ in completion_sets])
        scored = torch.cat([right_pad_to(scored, width, 0) for _, _, scored in completion_sets])
        rows = prompt_ids.size(0)
        per_token = shared_prefix_token_logps(
            model,
            prompt_ids.repeat(len(completion_sets), 1),
            prompt_mask.repeat(len(completion_sets), 1),
            ids,
            mask,
            temperature=self.temperature,
            max_rows=None if batch_size is None else 2 * batch_size,
            autocast=self.accelerator.autocast,
        )
        sums = (per_token * scored).sum(-1)  # tool results are attended to but not scored
        return [sums[i * rows : (i + 1) * rows] for i in range(len(completion_sets))]

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
        batch_size = batch_size or prompt_ids.size(0)
        chunks = []
        for start in range(0, prompt_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            input_ids, attention_mask, labels = concat_prompt_completion(
                prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows]
            )
            with self.accelerator.autocast():
                logps = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pbsd_logprobs=True)
            chunks.append(logps[:, -completion_ids.size(1) :])
        return torch.cat(chunks).float()

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
