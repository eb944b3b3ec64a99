"""What GRPOTrainer adds to its loss beyond its own objective, applied to PBSD's loss with the same meaning.

GRPOTrainer (TRL 1.16) reads three things off the policy forward of its loss and adds them to it: the Mixture-of-Experts
router load-balancing loss (`router_aux_loss_coef`, logged as `aux_loss`), the entropy bonus (`entropy_coef`,
`use_adaptive_entropy`, logged as `entropy`, `policy_loss`, `entropy_coef`), and the high-entropy token mask
(`top_entropy_quantile`). A user's model or config relies on them whatever the objective, so PBSD keeps them:

- the aux loss is the router loss of PBSD's student forward (both sample sets, from the student prompt), weighted by
  the same coefficient and scaled for gradient accumulation as GRPO scales it;
- the entropy bonus is the mean per-token entropy of the student on its own (on-policy) samples, `loss - coef·H`, with
  GRPO's static and adaptive controllers;
- `top_entropy_quantile < 1` lets only the top-ρ entropy tokens carry gradient: the other tokens' log-probs enter the
  margin as constants, so the loss value stays the PBSD loss (masking them out of the sums instead would compare a
  partial student log-prob with a full teacher one).

GRPO computes entropies with TRL's fused LM head; pbsd-trl's kernel does not, so when an entropy feature is on the
loss's student forward goes through TRL's head (teacher scoring keeps the configured head).
"""

import torch

from .logprobs import concat_prompt_completion


class GRPOLossFeatures:
    """Mixin for [`PBSDTrainer`]: GRPO's loss add-ons on the PBSD loss. Reads GRPOTrainer's own attributes."""

    def _entropy_needed(self) -> bool:
        return self._entropy_bonus_enabled or self.top_entropy_quantile < 1.0

    def _score_masks(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of the scored tokens of the student and teacher samples: GRPO's `tool_mask` zeroes tool results."""
        student = inputs["completion_mask"]
        if "tool_mask" in inputs:
            student = student * inputs["tool_mask"]
        teacher = inputs["teacher_completion_mask"]
        if "teacher_tool_mask" in inputs:
            teacher = teacher * inputs["teacher_tool_mask"]
        return student, teacher

    def _policy_forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """The loss's student forward: per-token log-probs `(B, C)` (0 on padding), per-token entropies (or None) and
        the MoE router aux loss (or None), all from one forward as in GRPO's `_compute_loss`."""
        width = completion_ids.size(1)
        if width == 0:
            return completion_ids.new_zeros(completion_ids.shape, dtype=torch.float32), None, None
        input_ids, attention_mask, labels = concat_prompt_completion(
            prompt_ids, prompt_mask, completion_ids, completion_mask
        )
        if self._entropy_needed() or not self.args.use_fused_logprob_kernel:
            logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                width,
                compute_entropy=self._entropy_needed(),
                compute_aux_loss=self.aux_loss_enabled,
            )
            return logps.float() * completion_mask, entropies, aux_loss
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pbsd_logprobs=True, **extra)
        logps, aux_loss = out if self.aux_loss_enabled else (out, None)
        return logps[:, -width:].float(), None, aux_loss

    def _high_entropy_mask(self, entropies, score_mask):
        """GRPO's top-ρ entropy mask over the scored tokens of this micro-batch (gathered over processes), or None."""
        if self.top_entropy_quantile >= 1.0:
            return None
        return self.get_high_entropy_mask(entropies, score_mask, 1 - self.top_entropy_quantile)

    @staticmethod
    def _gradient_only_through(per_token, entropy_mask):
        """Keep the values of all tokens, the gradient of the masked ones only."""
        if entropy_mask is None:
            return per_token
        return torch.where(entropy_mask, per_token, per_token.detach())

    def _add_grpo_regularizers(self, mode, loss, entropies, score_mask, entropy_mask, num_rows, aux_loss):
        """`loss - coef·H + router_coef·aux`, with GRPO's scaling, controllers and metrics."""
        metrics = self._metrics[mode]
        accumulation = (
            getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            if mode == "train"
            else 1.0
        )
        if entropies is not None:
            # The student's own samples: the rows GRPO would have
            own_entropies, own_mask = entropies[:num_rows], score_mask[:num_rows]
            stats = torch.stack([(own_entropies * own_mask).sum(), own_mask.sum()]).detach().float()
            total = self.accelerator.reduce(stats, reduction="sum")
            metrics["entropy"].append((total[0] / total[1].clamp(min=1.0)).item())
        if self._entropy_bonus_enabled:
            effective_mask = own_mask if entropy_mask is None else own_mask * entropy_mask[:num_rows]
            entropy_loss = (own_entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / accumulation
            if self.use_adaptive_entropy:
                apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            else:
                apply_coef = self.entropy_coef
            metrics["policy_loss"].append(self.accelerator.gather(loss.detach() * accumulation).nanmean().item())
            loss = loss - apply_coef * entropy_loss
            if self.use_adaptive_entropy and mode == "train":
                self._update_adaptive_entropy(own_entropies, effective_mask)
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled and aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        return loss

    def _update_adaptive_entropy(self, entropies, mask):
        """GRPO's Skywork-OR1 controller: window-global entropy at each optimizer step moves `entropy_coef`."""
        stats = torch.stack([(entropies * mask).sum(), mask.sum()]).detach()
        self._entropy_window_stats = (
            stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        )
        if not self.accelerator.sync_gradients:
            return
        window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
        args = self.args
        if world_entropy <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None
