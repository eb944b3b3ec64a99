"""Mixin for [`PBSDTrainer`]: how the teacher samples are drawn. The teacher rows go through GRPO's own
generation path with the teacher's weights swapped in, or ride in the student's `generate` call (one generation
pass: the same weights, or per-row PEFT adapters); its metrics are kept apart from the student's."""

import contextlib

import torch

from ..kernels.shared_prefix import shared_prompt_prefill
from ..logprobs import (
    record_sampled_token_logps,
    use_decoding_logps,
)
from .weights import TEACHER_ADAPTER_NAME


def _lora_row_scalings(model, adapter_names):
    """Per-row LoRA scalings (0 for `"__base__"` rows) on every layer, for a batch that mixes the active adapter and
    the base model; returns what to restore, or None where that does not apply (other adapter types or variants,
    several adapters in the batch)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    used = set(adapter_names) - {"__base__"}
    if len(used) != 1:
        return None
    (adapter,) = used
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if (
        not layers
        or any(
            type(m) is not LoraLinear
            or m.lora_variant.get(adapter) is not None
            or m.merged
            or list(m.active_adapters) != [adapter]
            for m in layers
            if adapter in getattr(m, "lora_A", {})
        )
        or any(not isinstance(m, LoraLinear) for m in layers)
    ):
        return None
    device = next(model.parameters()).device
    mask = torch.tensor([name != "__base__" for name in adapter_names], dtype=torch.float32, device=device).view(
        -1, 1, 1
    )
    restore = []
    for layer in layers:
        if adapter in layer.scaling:
            restore.append((layer, adapter, layer.scaling[adapter]))
            layer.scaling[adapter] = layer.scaling[adapter] * mask
    return restore


class TeacherGeneration:
    """Mixin of [`PBSDTrainer`]; reads the trainer's own attributes."""

    @contextlib.contextmanager
    def _teacher_sampling_weights(self):
        """Generation inside this context samples from the weights named by `teacher_samples_from`."""
        if self.args.teacher_samples_from == "live" or self.teacher.kind == "live":
            yield
        elif self.teacher.uses_separate_model:
            # GRPO's generation reads `self.model_wrapped`: point it at the teacher for the duration
            student_wrapped = self.model_wrapped
            self.model_wrapped = self.teacher.model
            try:
                yield
            finally:
                self.model_wrapped = student_wrapped
        else:
            with self.teacher.active():
                yield

    @contextlib.contextmanager
    def _teacher_generation_metrics(self, mode: str):
        """Keep GRPO's `completions/*` metrics and token count about the student: file teacher ones under `pbsd/`."""
        metrics = self._metrics[mode]
        before = {key: len(values) for key, values in metrics.items()}
        tokens_seen = self.state.num_input_tokens_seen
        num_tokens = metrics.get("num_tokens")
        num_tokens = list(num_tokens) if num_tokens is not None else None
        try:
            yield
        finally:  # also when interrupted: the student's metrics keep no teacher entries
            for key in [k for k in metrics if k.startswith(("completions/", "tools/"))]:
                new_values = metrics[key][before.get(key, 0) :]
                del metrics[key][before.get(key, 0) :]
                metrics[f"pbsd/teacher_{key}"].extend(new_values)
            self._teacher_tokens_seen += self.state.num_input_tokens_seen - tokens_seen
            self.state.num_input_tokens_seen = tokens_seen
            if num_tokens is None:
                metrics.pop("num_tokens", None)
            else:
                metrics["num_tokens"] = num_tokens

    def _setup_teacher_generation(self, args, train_dataset, eval_dataset, is_peft):
        """Open and check the teacher pool; decide whether student and teacher samples share one `generate` call."""
        self._teacher_pool = None
        if args.teacher_pool is not None:
            self.use_teacher_pool(args.teacher_pool, train_dataset, eval_dataset)
        # One generate call for both sample sets: same weights, or per-row PEFT adapters (adapter disabled = base)
        same_weights = args.teacher_model_kind == "live" or args.teacher_samples_from == "live"
        per_row_adapters = is_peft and args.teacher_model_kind != "live" and args.teacher_samples_from == "teacher"
        self._one_pass_mode = None
        if args.one_generation_pass and not self.use_vllm and not self.use_transformers_continuous_batching:
            self._one_pass_mode = "shared" if same_weights else "adapters" if per_row_adapters else None
        self._one_pass = None  # the plan of the step being generated
        # A one-pass call samples the teacher rows with the teacher's own weights (live, or the base/EMA adapter rows)
        # except when a non-live teacher's samples come from the live weights: then its logits are the teacher's
        samples_with_teacher_weights = args.teacher_model_kind == "live" or args.teacher_samples_from == "teacher"
        reuse = use_decoding_logps(
            args.teacher_logps_from_generation,
            self.accelerator.unwrap_model(self.model),
            self.accelerator.mixed_precision != "no",
        )
        self._teacher_logps_from_generation = (
            reuse and self._one_pass_mode is not None and samples_with_teacher_weights
        )

    def teacher_weights_model(self):
        """The module holding the teacher's weights (the frozen copy, or the PEFT model whose adapter it disables)."""
        return self.accelerator.unwrap_model(self.teacher.model if self.teacher.uses_separate_model else self.model)

    def _teacher_logps_of_generation(self, one_pass, teacher_rows, sampled_ids, num_rows):
        """Per-token `(num_rows, T)` teacher log-probs of the teacher samples recorded in the one generation pass, or
        None where there are none (two calls, a pool, a recording that did not line up)."""
        rows = None if one_pass is None else one_pass.get("teacher_token_logps")
        if rows is None or [len(r) for r in rows] != [len(ids) for ids in sampled_ids]:
            return None
        per_token = torch.zeros(num_rows, max([len(r) for r in rows], default=0), device=self.accelerator.device)
        for i, row in zip(teacher_rows, rows, strict=True):
            per_token[i, : len(row)] = torch.tensor(row, device=per_token.device)
        return per_token

    def _decode_completions(self, prompts, completion_ids):
        """Completions as `_generate` decodes them (text, or an assistant message for conversational prompts)."""
        from trl.data_utils import is_conversational

        if not is_conversational({"prompt": prompts[0]}):
            return self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        tokenizer = self._tokenizer
        if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None):
            from transformers.utils.chat_parsing_utils import parse_response

            prompt_ids = self._tokenize_prompts(prompts)[0]
            return [
                [parse_response(tokenizer, ids, prefix=p)] for ids, p in zip(completion_ids, prompt_ids, strict=True)
            ]
        contents = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        return [[{"role": "assistant", "content": content}] for content in contents]

    def _plan_one_pass(self, teacher_prompts):
        """What the student's `generate` call also samples for the teacher this step (None: a separate call)."""
        if self._one_pass_mode is None or self._is_agent:  # a tool loop calls generate once per turn
            return None
        from trl.data_utils import is_conversational

        if is_conversational({"prompt": teacher_prompts[0]}) and self._is_vlm:
            return None  # images ride along with the prompts: keep the two calls
        return {"teacher_ids": self._tokenize_prompts(teacher_prompts)[0]}

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        plan = self._one_pass
        if plan is None or images is not None:
            with self._shared_prompt_prefill(images):
                return super()._generate_single_turn(
                    prompt_ids, images, multimodal_fields, num_generations, has_tool_images
                )
        if "teacher_result" in plan:  # the teacher's `_generate`: its samples were drawn with the student's
            if list(map(list, prompt_ids)) != plan["teacher_ids"]:
                raise RuntimeError(
                    "One-pass generation: the teacher prompts differ from those sampled with the student."
                )
            self._one_pass = None
            return plan.pop("teacher_result")
        num_student = len(prompt_ids)
        adapters = None
        if self._one_pass_mode == "adapters":
            active = self.accelerator.unwrap_model(self.model).active_adapter
            teacher = "__base__" if self.teacher.kind == "base" else TEACHER_ADAPTER_NAME  # PEFT's name for "none"
            adapters = [active] * num_student + [teacher] * len(plan["teacher_ids"])
        with (
            self._per_row_adapters(adapters) as select_rows,
            self._shared_prompt_prefill(images, select_rows),
            self._sampled_token_logps() as recorder,
        ):
            ids, logprobs = super()._generate_single_turn(
                list(prompt_ids) + plan["teacher_ids"], images, multimodal_fields, num_generations, has_tool_images
            )
        split = lambda values: (None, None) if values is None else (values[:num_student], values[num_student:])  # noqa: E731
        (student_ids, teacher_ids), (student_logprobs, teacher_logprobs) = split(ids), split(logprobs)
        plan["teacher_result"] = (teacher_ids, teacher_logprobs)
        if recorder is not None:
            plan["teacher_token_logps"] = split(recorder.per_row(ids))[1]
        return student_ids, student_logprobs

    @contextlib.contextmanager
    def _sampled_token_logps(self):
        """Records the log-probs of the one-pass call's samples when they are the teacher's (see
        `teacher_logps_from_generation`); yields None otherwise."""
        if not self._teacher_logps_from_generation:
            yield None
            return
        with record_sampled_token_logps(self.accelerator.unwrap_model(self.model_wrapped), self.temperature) as rec:
            yield rec

    @contextlib.contextmanager
    def _shared_prompt_prefill(self, images, select_rows=None, share_attention=None):
        """GRPO's HF `generate` call with each distinct prompt row prefilled once and, on CPU, each prompt's cache
        attended to once for its samples (`pbsd_trl.kernels.shared_prefix`); `share_attention` as in
        [`shared_prompt_prefill`]."""
        model = self.accelerator.unwrap_model(self.model_wrapped)
        if (
            not self.args.share_prompt_prefill
            or self.use_vllm
            or images is not None
            or self._is_vlm
            or select_rows is False  # PEFT's `adapter_names` sub-batches: the prefill could not follow them
        ):
            yield
            return
        with shared_prompt_prefill(model, select_rows or None, share_attention=share_attention):
            yield

    @contextlib.contextmanager
    def _per_row_adapters(self, adapter_names):
        """A mixed-adapter batch for GRPO's `generate` call: row i computes with adapter `adapter_names[i]`.

        Yields how to switch the per-row state to a subset of the rows (see `shared_prompt_prefill`), None where there
        is none, or False where the batch cannot be split that way."""
        if adapter_names is None:
            yield None
            return
        model = self.accelerator.unwrap_model(self.model_wrapped)
        masked = _lora_row_scalings(model, adapter_names)
        if masked is not None:
            # Rows with the adapter off get a LoRA scaling of 0: one batched LoRA product per layer instead of PEFT's
            # per-adapter sub-batches, which index the batch in Python at every layer of every decoding step
            row_scalings = [(layer, adapter, layer.scaling[adapter]) for layer, adapter, _ in masked]

            def select_rows(index):
                for layer, adapter, scaling in row_scalings:
                    layer.scaling[adapter] = scaling if index is None else scaling[index]

            try:
                yield select_rows
            finally:
                for layer, adapter, scaling in masked:
                    layer.scaling[adapter] = scaling
            return
        original = model.__dict__.get("generate")
        generate = model.generate
        model.generate = lambda *a, **kw: generate(*a, adapter_names=adapter_names, **kw)
        # PEFT refuses `adapter_names` in training mode; dropout is disabled for PBSD, so eval() changes nothing else
        was_training = model.training
        model.eval()
        try:
            yield False
        finally:
            model.train(was_training)
            if original is None:
                del model.generate
            else:
                model.generate = original
