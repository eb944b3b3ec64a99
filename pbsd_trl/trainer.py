"""`PBSDTrainer`: GRPO's sampling loop, PBSD's pairwise loss against a privileged-context teacher."""

import contextlib
import logging
import os
import textwrap
from collections import defaultdict

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head

from .agent import AgentRollouts, checked_rollout_func
from .checkpoint import CheckpointError, check_checkpoint, checkpoint_info, write_checkpoint_info
from .config import PBSDConfig
from .grpo_features import GRPOLossFeatures
from .logprobs import (
    add_pbsd_logprob_head,
    concat_prompt_completion,
    record_sampled_token_logps,
    reset_forward_patches,
    right_pad_to,
    use_decoding_logps,
)
from .loss import (
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
from .pool.state import load_pool_state, save_pool_state
from .rewards.guard import guard_environment_rewards, guard_reward_funcs
from .rewards.validation import weighted_reward_sum
from .shared_prefix import shared_prefix_token_logps, shared_prompt_prefill, supports_shared_prefix
from .teacher import (
    ROW_INDEX_COLUMN,
    TeacherPromptBuilder,
    teacher_position_limit,
)
from .teacher_batch import TeacherBatch, TeacherDraw, TeacherRows
from .teacher_model import TEACHER_ADAPTER_NAME, TEACHER_STATE_FILE, TeacherEMACallback, TeacherWeights
from .trainer_checks import (
    check_privileged_column,
    check_teacher_prompts,
    check_tokenizer,
    check_trainer_arguments,
    named_datasets,
    reward_use,
)


logger = logging.getLogger(__name__)


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


def _with_row_index(dataset):
    """An iterable dataset with each row's stream position in `ROW_INDEX_COLUMN`, for errors that name the row."""
    if isinstance(dataset, dict):
        return {key: _with_row_index(value) for key, value in dataset.items()}
    if isinstance(dataset, IterableDataset):
        return dataset.map(lambda row, index: {ROW_INDEX_COLUMN: index}, with_indices=True)
    return dataset


def _no_reward(prompts, completions, **kwargs):
    """Placeholder that lets GRPOTrainer construct without reward functions; removed right after."""
    return [0.0] * len(prompts)


class PBSDTrainer(GRPOLossFeatures, AgentRollouts, GRPOTrainer):
    """
    Trainer for Preference-Based Self-Distillation (PBSD), a drop-in replacement for [`~trl.GRPOTrainer`].

    Each step samples completions from the student `π_θ(·|x)` exactly as GRPO does, samples completions from the
    teacher (the same network prompted with the privileged context `c`, `π_T(·|x,c)`) through the same generation
    backend, scores both sets with the teacher (no gradient) and the student (with gradient), and minimizes the
    logistic loss on the implicit-reward margin between teacher and student samples. See [`PBSDConfig`].

    The constructor takes GRPOTrainer's arguments. `reward_funcs` are optional with the default `pair_labels="role"`
    (rewards are then only computed, and logged, when given), and needed where the loss reads them
    (`pair_labels="reward"` or `"soft"`, `teacher_weighting="tilted"`). The datasets need a
    privileged-context column (`args.privileged_context_column`) of strings.
    """

    _tag_names = ["trl", "pbsd"]
    _name = "PBSD"
    _paper = {
        "title": "Preference-Based Self-Distillation: Beyond KL Matching via Reward Regularization",
        "id": "2605.05040",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{yu2026pbsd,
                title        = {{Preference-Based Self-Distillation: Beyond KL Matching via Reward Regularization}},
                author       = {Yu and Liao and Zhang and Yu and Xue and Guo},
                year         = 2026,
                eprint       = {arXiv:2605.05040},
            }"""),
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: PBSDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = PBSDConfig(f"{str(model_name).split('/')[-1] or 'model'}-PBSD")
        reward_funcs = [] if reward_funcs is None else reward_funcs
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        check_trainer_arguments(args, reward_funcs, rollout_func, environment_factory)
        check_tokenizer(processing_class)
        for name, dataset in named_datasets(train_dataset, eval_dataset):
            check_privileged_column(dataset, name, args, check_prompts=environment_factory is None)

        self._has_reward_funcs = bool(reward_funcs)
        reward_failures = []
        reward_funcs = guard_reward_funcs(reward_funcs, reward_failures) if reward_funcs else [_no_reward]
        if isinstance(model, torch.nn.Module):  # a model object a previous trainer patched (a re-run notebook cell)
            reset_forward_patches(model.get_base_model() if hasattr(model, "peft_config") else model)
        super().__init__(
            model=model,
            reward_funcs=list(reward_funcs),  # GRPO appends environments' rewards to the list it is given
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=checked_rollout_func(rollout_func),
            environment_factory=environment_factory,
        )
        self._reward_failures = reward_failures
        # An environment's `get_reward`, which GRPO appends after `reward_funcs`, is guarded like them
        ours = len(reward_funcs)
        self.reward_funcs[ours:] = guard_environment_rewards(
            self.reward_funcs[ours:], self.reward_func_names[ours:], reward_failures
        )
        if not self._has_reward_funcs:
            # Drop the placeholder; an environment's own `get_reward`, appended by GRPO after it, stays
            self.reward_funcs = self.reward_funcs[1:]
            self.reward_func_names = self.reward_func_names[1:]
            self.reward_processing_classes = self.reward_processing_classes[1:]
            self.reward_weights = self.reward_weights[1:]
            self._has_reward_funcs = bool(self.reward_funcs)
            if args.uses_rewards_in_loss and not self._has_reward_funcs:
                raise ValueError(
                    f"{reward_use(args)}: pass at least one reward function (or an environment with a "
                    "`get_reward` method)."
                )

        is_peft = hasattr(self.model, "peft_config")
        # (a non-live teacher with vLLM and `teacher_samples_from="teacher"` is refused by PBSDConfig, before an
        # engine is built)
        if self.use_vllm and args.teacher_samples_from == "live" and args.teacher_model_kind != "live":
            logger.warning(
                "Teacher samples come from the current weights through vLLM (teacher_samples_from='live'); they are "
                "scored with the '%s' teacher weights.",
                args.teacher_model_kind,
            )

        # Scoring heads. GRPO has already added TRL's fused head to the student.
        if args.use_fused_logprob_kernel is None:
            # Measured: ours is faster and leaner than TRL's torch fallback, and 1.5-2x slower than its Triton kernel
            args.use_fused_logprob_kernel = self.accelerator.device.type != "cuda"
        if args.use_fused_logprob_kernel:
            add_pbsd_logprob_head(self._base_model(self.model), self.temperature)
        self.teacher = TeacherWeights(self, args.teacher_model_kind, is_peft)
        if self.teacher.uses_separate_model:
            add_fused_lm_head(self.teacher.model, temperature=self.temperature)
            if args.use_fused_logprob_kernel:
                add_pbsd_logprob_head(self.teacher.model, self.temperature)
            self.teacher.prepare()
        if args.teacher_model_kind == "ema":
            self.add_callback(TeacherEMACallback(self.teacher, args.teacher_sync_steps))
        if rollout_func is not None and self.teacher.uses_separate_model and args.teacher_samples_from == "teacher":
            raise ValueError(
                f"A `rollout_func` generates with weights PBSD cannot swap: the '{args.teacher_model_kind}' teacher "
                "is a separate model here. Use a PEFT model (the teacher is then the same model with its adapter "
                "switched), `teacher_model_kind='live'`, or `teacher_samples_from='live'`."
            )

        tokenizer = self._tokenizer
        check_tokenizer(tokenizer)
        self.teacher_prompts = TeacherPromptBuilder(
            template=args.teacher_prompt_template,
            column=args.privileged_context_column,
            allow_empty=args.allow_empty_privileged_context,
            max_length=args.max_teacher_prompt_length,
            count_tokens=lambda prompts: [len(ids) for ids in self._tokenize_prompts(prompts)[0]],
            encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
            # environments: tokenizing needs the batch's environments, which exist only once generation starts
            position_limit=self._teacher_position_limit() if self.environment_factories is None else None,
        )
        for name, dataset in named_datasets(self.train_dataset, self.eval_dataset):
            self._check_teacher_prompts(dataset, name)
        self._last_rewards_per_func = None
        self._pair_table = {}  # mode -> global per-row values that `pairing="all"` pairs against
        self._teacher_tokens_seen = 0
        self._setup_teacher_generation(args, train_dataset, eval_dataset, is_peft)

    # ---- data loaders -------------------------------------------------------------------------------------------
    # The rows of a stream get their position (`_with_row_index`, for errors that name the row) in the loader only:
    # `trainer.train_dataset` / `eval_dataset` stay the user's objects, as in GRPOTrainer.
    def get_train_dataloader(self):
        dataset = self.train_dataset
        self.train_dataset = _with_row_index(dataset)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = dataset

    def get_eval_dataloader(self, eval_dataset=None):
        if eval_dataset is not None and not isinstance(eval_dataset, str):  # a dataset given to `evaluate()`
            check_privileged_column(
                eval_dataset, "eval_dataset", self.args, check_prompts=self.environment_factories is None
            )
            self._check_teacher_prompts(eval_dataset, "eval_dataset")
            return super().get_eval_dataloader(_with_row_index(eval_dataset))
        datasets = self.eval_dataset
        self.eval_dataset = _with_row_index(datasets)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.eval_dataset = datasets

    # ---- construction checks ------------------------------------------------------------------------------------
    def _teacher_position_limit(self) -> tuple[int, str] | None:
        """Most tokens a teacher prompt may take: the model's positions (or vLLM's `max_model_len`) less a completion."""
        return teacher_position_limit(self._base_model(self.model).config, self.args, self.use_vllm)

    def _check_teacher_prompts(self, dataset, name: str) -> None:
        check_teacher_prompts(
            self.teacher_prompts,
            dataset,
            name,
            self.args.privileged_context_column,
            self.environment_factories is not None,
        )

    def _set_signature_columns_if_needed(self):
        # With `remove_unused_columns=True`, keep the privileged context and the reward functions' columns' carrier
        super()._set_signature_columns_if_needed()
        extra = [
            c for c in (self.args.privileged_context_column, ROW_INDEX_COLUMN) if c not in self._signature_columns
        ]
        self._signature_columns = [*self._signature_columns, *extra]

    def _base_model(self, model):
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if hasattr(model, "peft_config") else model

    # ---- rewards ------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if not self.reward_funcs:
            # Role-labelled PBSD without reward functions: an empty (rows, 0) table, no collective needed
            rewards = torch.zeros(len(prompts) * self.accelerator.num_processes, 0, device=self.accelerator.device)
        else:
            self._reward_failures.clear()
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._raise_reward_failures()
        self._last_rewards_per_func = rewards
        return rewards

    def _raise_reward_failures(self) -> None:
        """Raise the first reward-function error of any process on every process, with the same type and message.

        The guarded functions record their errors instead of raising, so every process reaches GRPO's gather; one
        flag all-reduce then tells every process whether to stop, instead of the healthy ones waiting in the next
        collective until its timeout.
        """
        local = self._reward_failures[0] if self._reward_failures else None
        self._reward_failures.clear()
        world = self.accelerator.num_processes
        if world == 1:
            if local is not None:
                raise local
            return
        flag = torch.tensor([float(local is not None)], device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() == 0:
            return
        report = None if local is None else (type(local).__name__, str(local))
        reports = gather_object([report])
        rank, (kind, message) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
        error_type = ValueError if kind == "ValueError" else RuntimeError
        raise error_type(f"{message} [on process {rank} of {world}; every process stops]") from local

    def _weighted_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor | None:
        """Weighted sum over reward functions per row (NaN where every function returned None); None without any."""
        if rewards_per_func.size(1) == 0:
            return None
        totals = weighted_reward_sum(rewards_per_func.T.tolist(), self.reward_weights.tolist())
        values = [torch.nan if total is None else total for total in totals]
        return torch.tensor(values, dtype=torch.float32, device=rewards_per_func.device)

    # ---- teacher sampling ---------------------------------------------------------------------------------------
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

    @contextlib.contextmanager
    def _isolated_reward_logs(self):
        """Teacher reward calls must not flush `log_extra`/`log_metric` entries into the student's table."""
        saved = self._pending_extra_logs, self._pending_metrics
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        try:
            yield
        finally:
            self._pending_extra_logs, self._pending_metrics = saved

    # ---- teacher samples: pool, one generation pass ------------------------------------------------------------
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

    def use_teacher_pool(self, path: str, train_dataset=None, eval_dataset=None, warn_missing: bool = True) -> None:
        """Take the base teacher's samples from the pool at `path` (what `teacher_pool` does at construction).

        Refuses a pool drawn from other teacher weights, tokenizer, teacher prompt or sampling settings, or with fewer
        than `num_teacher_generations` samples per row. Batches with a row the pool lacks sample the teacher online
        (with vLLM, which cannot sample the base teacher, every row must be in the pool); `warn_missing=False` leaves
        out the warning that counts such training rows (for a pool of the rows a run visits, which says so itself).
        """
        from .pool import TeacherPool, pool_stamp, row_key

        args = self.args
        if args.teacher_model_kind != "base" or args.teacher_samples_from != "teacher":
            raise ValueError(
                "A teacher pool serves `teacher_model_kind='base'` with `teacher_samples_from='teacher'`."
            )
        pool = TeacherPool(path, stride=args.num_teacher_generations)
        pool.check(
            pool_stamp(self.teacher_weights_model(), self._tokenizer, args, self.eos_token_ids),
            args.num_teacher_generations,
        )
        train_dataset = self.train_dataset if train_dataset is None else train_dataset
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        column = args.privileged_context_column
        for name, dataset in named_datasets(train_dataset, eval_dataset):
            if not isinstance(dataset, Dataset):
                continue
            if self.use_vllm:  # vLLM cannot sample the base teacher online: every row must come from the pool
                pool.check_covers(dataset, column, name)
            elif name == "train_dataset" and warn_missing:
                missing = sum(
                    not pool.has(row_key(p, c)) for p, c in zip(dataset["prompt"], dataset[column], strict=True)
                )
                if missing:
                    logger.warning(
                        "The teacher pool at %s has no samples for %d of the %d rows of train_dataset: batches holding "
                        "such a row sample the teacher online.",
                        path,
                        missing,
                        len(dataset),
                    )
        args.teacher_pool = path
        self._teacher_pool = pool

    def _pool_serves(self, inputs) -> bool:
        if self._teacher_pool is None or self._is_agent:  # a multi-turn teacher rollout is not a stored completion
            return False
        from .pool import row_key

        column = self.args.privileged_context_column
        return all(self._teacher_pool.has(row_key(row["prompt"], row[column])) for row in inputs)

    def _teacher_samples_from_pool(self, inputs, teacher_prompts, teacher_rows, row_index, group_size):
        """(completion ids, decoded completions, teacher log-probs) of the teacher rows, taken from the pool."""
        from .pool import row_key

        column = self.args.privileged_context_column
        keys = [row_key(inputs[i]["prompt"], inputs[i][column]) for i in teacher_rows]
        global_rows = [int(row_index[i]) for i in teacher_rows]
        ids, logps = self._teacher_pool.draw(
            keys, [r % group_size for r in global_rows], [r // group_size for r in global_rows]
        )
        completions = self._decode_completions([teacher_prompts[i] for i in teacher_rows], ids)
        return ids, completions, logps

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
        attended to once for its samples (`pbsd_trl.shared_prefix`); `share_attention` as in
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

    # ---- generation and scoring ---------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        args = self.args
        # Build (and validate) the teacher prompts before any generation, so bad rows fail fast
        if self.environment_factories is not None:  # an environment may own the prompt (GRPO's default)
            prompts = [row.get("prompt", [{"role": "user", "content": ""}]) for row in inputs]
        else:
            prompts = self.teacher_prompts.prompts(inputs)
        teacher_prompts, truncated = self.teacher_prompts(prompts, inputs)
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        teacher_group_size = group_size if args.pairing == "matched" else min(args.num_teacher_generations, group_size)
        rows = TeacherRows.of_batch(
            len(inputs), group_size, teacher_group_size, self.accelerator.process_index, self.accelerator.device
        )
        from_pool = self._pool_serves(inputs)
        self._one_pass = None if from_pool else self._plan_one_pass([teacher_prompts[i] for i in rows.rows])
        one_pass = self._one_pass

        output = super()._generate_and_score_completions(inputs)
        student_rewards = self._last_rewards_per_func
        if self.environment_factories is not None:
            # The teacher prompt wraps the prompt the student saw, the environment's observation included
            prompts = self._student_prompts_seen(prompts)
            teacher_prompts, truncated = self.teacher_prompts(prompts, inputs)
        draw = self._draw_teacher_samples(inputs, prompts, teacher_prompts, rows, from_pool, mode)
        batch = self._pad_teacher_batch(output, teacher_prompts, rows, draw)
        self._score_teacher_batch(output, batch, rows, draw, one_pass, mode)
        student_rewards, teacher_rewards = self._row_rewards(student_rewards, draw.rewards, rows)
        table = self._pair_table_of(output, batch, rows, student_rewards, teacher_rewards)
        if args.pairing == "matched":  # a matched pair stays in its row: the rows carry it to the loss
            output.update({f"pbsd_pair_{k}": v for k, v in table.matched_row_values(rows.row_index).items()})
        else:
            self._pair_table[mode] = table
        output.update(
            batch.outputs(),
            pbsd_labels=preference_labels(
                teacher_rewards if teacher_rewards is not None else rows.has_teacher.float(),
                student_rewards,
                args.pair_labels,
                args.tie_policy,
            ),
            pbsd_has_teacher=rows.has_teacher,
            pbsd_row_index=rows.row_index,
            pbsd_num_pairs=table.pairs.weight.sum().float(),
        )
        student_scored, teacher_scored = self._score_masks(output)
        self._log_generation_metrics(
            mode,
            rows.has_teacher,
            table,
            teacher_rewards,
            student_rewards,
            teacher_scored.sum(1),
            student_scored.sum(1),
        )
        truncated = torch.tensor(truncated, dtype=torch.float32, device=rows.row_index.device)
        self._metrics[mode]["pbsd/context_truncated_frac"].append(self._global_mean(truncated))
        self._logs["extra"]["teacher_completion"].extend(gather_object(rows.scatter(draw.completions)))
        return output

    def _draw_teacher_samples(self, inputs, prompts, teacher_prompts, rows, from_pool, mode) -> TeacherDraw:
        """The teacher's samples for its rows and their rewards: from the pool, or through GRPO's own generation path
        (HF generate, vLLM colocate/server), tool/environment loop and rollout_func included, on the teacher rows'
        slice of the per-row rollout state; with one generation pass they were drawn in the student's call and this
        call only decodes and logs them."""
        teacher_rows = rows.rows
        if from_pool:  # drawn ahead of time by the base teacher, with their teacher log-probs
            ids, completions, pool_logps = self._teacher_samples_from_pool(
                inputs, teacher_prompts, teacher_rows, rows.row_index, rows.group_size
            )
            draw = {"ids": ids, "completions": completions, "pool_logps": pool_logps}
            extra = {}
        else:
            self._reset_teacher_environments(inputs, teacher_rows, prompts)
            with self._teacher_rows_state(teacher_rows):
                try:
                    with self._teacher_generation_metrics(mode), self._teacher_sampling_weights():
                        rollout_prompt_ids, ids, tool_mask_rows, completions, _, extra, *_ = self._generate(
                            [teacher_prompts[i] for i in teacher_rows]
                        )
                finally:
                    self._one_pass = None
            draw = {"ids": ids, "completions": completions}
            draw.update(rollout_prompt_ids=rollout_prompt_ids, tool_mask_rows=tool_mask_rows)
        with self._isolated_reward_logs():
            rewards = self._calculate_rewards(
                self._teacher_reward_rows(inputs, teacher_rows, extra),
                [prompts[i] for i in teacher_rows],  # rewards judge the answer to the student's question
                draw["completions"],
                draw["ids"],
            )
        return TeacherDraw(rewards=rewards, **draw)

    def _pad_teacher_batch(self, output, teacher_prompts, rows, draw) -> TeacherBatch:
        """Per-row teacher tensors; rows without a teacher sample get an empty completion."""
        pad_id = self._tokenizer.pad_token_id
        # A rollout_func tokenizes its own prompts (every row has a teacher rollout then)
        prompt_lists = (
            draw.rollout_prompt_ids if self.rollout_func is not None else self._tokenize_prompts(teacher_prompts)[0]
        )
        end_ids = [*self.eos_token_ids, pad_id] if self.mask_truncated_completions else None
        device = rows.row_index.device
        batch = TeacherBatch.pad(
            prompt_lists, rows.scatter(draw.ids, list), pad_id, device, self.pad_to_multiple_of, end_ids
        )
        if draw.tool_mask_rows is not None:
            output["teacher_tool_mask"] = self._pad_tool_mask(
                draw.tool_mask_rows, rows.num_rows, rows.rows, device, batch.completion_ids.size(1)
            )
        return batch

    def _score_teacher_batch(self, output, batch, rows, draw, one_pass, mode) -> None:
        """Teacher log-probs of both sample sets, from the teacher prompt and weights (no gradient), into `batch`."""
        args = self.args
        student_scored, teacher_scored = self._score_masks(
            {**output, "teacher_completion_mask": batch.completion_mask}
        )
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        with torch.no_grad(), disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs):
            with self.teacher.active():
                scorer = self.teacher.scoring_model(self.model)
                sets = [(output["completion_ids"], output["completion_mask"], student_scored)]
                generation_logps = self._teacher_logps_of_generation(one_pass, rows.rows, draw.ids, rows.num_rows)
                if draw.pool_logps is None and generation_logps is None:
                    sets.append((batch.completion_ids, batch.completion_mask, teacher_scored))
                batch.logps_student_samples, *rest = self._teacher_sequence_logps(
                    scorer, batch.prompt_ids, batch.prompt_mask, sets, batch_size
                )
        if rest:
            batch.logps_teacher_samples = rest[0]
        elif generation_logps is not None:
            # the teacher's log-probs of its own samples, recorded while it sampled them in the one pass
            width = teacher_scored.size(1)
            batch.logps_teacher_samples = (right_pad_to(generation_logps, width, 0)[:, :width] * teacher_scored).sum(
                -1
            )
        else:
            logps = torch.zeros(rows.num_rows, device=rows.row_index.device)
            logps[rows.rows] = torch.tensor(draw.pool_logps, device=logps.device)
            # a completion masked out (truncated, with `mask_truncated_completions`) scores 0, as online
            batch.logps_teacher_samples = logps * batch.completion_mask.any(1)

    def _row_rewards(self, student_rewards, teacher_rewards, rows):
        """This process's `(n,)` student and teacher rewards (weighted over reward functions; NaN on rows without a
        teacher sample), from GRPO's gathered tables; `(None, None)` without reward functions."""
        student_rewards = self._weighted_rewards(student_rewards)
        teacher_rewards = self._weighted_rewards(teacher_rewards)
        if student_rewards is None:
            return None, None
        rank, num_rows, n_teacher = self.accelerator.process_index, rows.num_rows, len(rows.rows)
        teacher_rows = torch.full((num_rows,), torch.nan, device=rows.row_index.device)
        teacher_rows[rows.rows] = teacher_rewards[rank * n_teacher : (rank + 1) * n_teacher]
        return student_rewards[rank * num_rows : (rank + 1) * num_rows], teacher_rows

    def _pair_table_of(self, output, batch, rows, student_rewards, teacher_rewards) -> PairTable:
        """The generation batch's samples (gathered over processes) and their pairs ([`make_pairs`]); for pairings
        across rows, every sample's log-ratio too."""
        args = self.args
        samples = Samples.of_rows(
            gather(rows.row_index // rows.group_size),
            gather(rows.has_teacher),
            None if student_rewards is None else gather(student_rewards),
            None if teacher_rewards is None else gather(teacher_rewards),
            hashes=(
                gather(sequence_hashes(output["completion_ids"], output["completion_mask"])),
                gather(sequence_hashes(batch.completion_ids, batch.completion_mask)),
            ),
        )
        pairs = make_pairs(
            samples,
            args.pairing,
            args.pair_labels,
            args.tie_policy,
            args.reward_temperature,
            args.teacher_weighting,
            args.pbsd_loss_type,
        )
        log_ratios = None if args.pairing == "matched" else self._partner_log_ratios(output, batch)
        return PairTable(samples, pairs, log_ratios)

    def _teacher_sequence_logps(self, scorer, prompt_ids, prompt_mask, completion_sets, batch_size=None):
        """Teacher log-prob sums of several `(ids, mask, score_mask)` completion sets given the same teacher prompts
        (no gradient).

        With pbsd-trl's kernel on a supported model, the rows of a prompt group share one teacher-prompt forward
        whose KV cache serves all their completions, of every set (`pbsd_trl.shared_prefix`); else one
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

    def _global_mean(self, values, mask=None):
        """Mean of `values` over `mask` (default: all) and every process, NaN entries left out; NaN when empty."""
        values = values.detach().float()
        mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
        mask = mask & ~torch.isnan(values)
        stats = torch.stack([values.masked_fill(~mask, 0).sum(), mask.float().sum()])
        total, count = self.accelerator.reduce(stats, reduction="sum").tolist()
        return total / count if count else float("nan")

    def _log_generation_metrics(
        self, mode, has_teacher, table, teacher_rewards, student_rewards, teacher_lengths, student_lengths
    ):
        metrics = self._metrics[mode]
        global_mean = self._global_mean
        metrics["pbsd/teacher_length"].append(global_mean(teacher_lengths.float(), has_teacher))
        metrics["pbsd/student_length"].append(global_mean(student_lengths.float()))
        metrics["pbsd/teacher_num_tokens"] = [float(self._teacher_tokens_seen)]
        if student_rewards is not None:
            metrics["pbsd/teacher_reward"].append(global_mean(teacher_rewards, has_teacher))
            metrics["pbsd/student_reward"].append(global_mean(student_rewards))
            flipped = student_rewards > torch.nan_to_num(teacher_rewards, nan=-float("inf"))
            metrics["pbsd/flipped_frac"].append(global_mean(flipped.float(), has_teacher))
        if self.args.pair_labels != "role":  # the pair table is global already: no reduction
            pairs, is_teacher = table.pairs, table.samples.is_teacher
            mixed = is_teacher[pairs.first] & ~is_teacher[pairs.second]
            kept = pairs.weight > 0
            flipped = (pairs.target < 0.5) & kept & mixed
            metrics["pbsd/label_flipped_frac"].append((flipped.sum() / mixed.sum().clamp(min=1)).item())
            metrics["pbsd/label_dropped_frac"].append((~kept).float().mean().item() if len(pairs) else float("nan"))

    # ---- loss ---------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        args = self.args
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        student_ids, student_mask = inputs["completion_ids"], inputs["completion_mask"]
        teacher_ids, teacher_mask = inputs["teacher_completion_ids"], inputs["teacher_completion_mask"]
        num_rows = prompt_ids.size(0)

        # One student forward over both sample sets, each scored from the student prompt; tool-result tokens are
        # attended to but not scored (GRPO's `tool_mask`)
        width = max(student_ids.size(1), teacher_ids.size(1))
        pad_id = self._tokenizer.pad_token_id
        completion_ids = torch.cat(
            [right_pad_to(student_ids, width, pad_id), right_pad_to(teacher_ids, width, pad_id)]
        )
        completion_mask = torch.cat([right_pad_to(student_mask, width, 0), right_pad_to(teacher_mask, width, 0)])
        student_mask, teacher_mask = self._score_masks(inputs)
        score_mask = torch.cat([right_pad_to(student_mask, width, 0), right_pad_to(teacher_mask, width, 0)])
        per_token, entropies, aux_loss = self._policy_forward(
            model, prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1), completion_ids, completion_mask
        )
        entropy_mask = self._high_entropy_mask(entropies, score_mask)
        per_token = self._gradient_only_through(per_token, entropy_mask)
        policy_logps = (per_token * score_mask).sum(-1)
        policy_student, policy_teacher = policy_logps[:num_rows], policy_logps[num_rows:]

        lengths_t = teacher_mask.sum(1) if args.length_normalize else None
        lengths_s = student_mask.sum(1) if args.length_normalize else None
        teacher_log_ratios = implicit_log_ratios(policy_teacher, inputs["teacher_logps_teacher_samples"], lengths_t)
        student_log_ratios = implicit_log_ratios(policy_student, inputs["teacher_logps_student_samples"], lengths_s)

        if args.pairing == "matched":
            values = [inputs[f"pbsd_pair_{name}"] for name in ("target", "weight", "rewards", "hashes")]
            table = PairTable.of_matched_rows(inputs["pbsd_has_teacher"], *values)
            row_index = torch.arange(num_rows, device=prompt_ids.device)
        else:
            table, row_index = self._pair_table[mode], inputs["pbsd_row_index"]
        log_ratios, share = table.micro_batch(row_index, student_log_ratios, teacher_log_ratios)
        loss_sum, margins = pbsd_loss(
            log_ratios, table.pairs, args.pbsd_beta, args.label_smoothing, args.pbsd_loss_type, share, "sum"
        )

        # Normalize so that summing micro-batches and averaging over processes gives the mean over all pairs of the
        # generation batch (and of one optimizer step when a generation batch spans several)
        num_pairs = inputs["pbsd_num_pairs"].clamp(min=1.0)
        scale = self.accelerator.num_processes / num_pairs
        if mode == "train":
            accumulation = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
            scale = scale * args.steps_per_generation / accumulation
        loss = loss_sum * scale
        loss = self._add_grpo_regularizers(mode, loss, entropies, score_mask, entropy_mask, num_rows, aux_loss)

        self._log_loss_metrics(
            mode,
            pair_statistics(margins, table.pairs, table.samples, share, rewards_decide=args.uses_rewards_in_loss),
            teacher_log_ratios,
            student_log_ratios,
            inputs["pbsd_has_teacher"],
            policy_student - inputs["teacher_logps_student_samples"],
        )
        return loss

    def _log_loss_metrics(self, mode, statistics, teacher_log_ratios, student_log_ratios, has_teacher, student_kl):
        """Pair statistics ([`pair_statistics`], reduced over processes) and per-sample log-ratio means."""
        metrics = self._metrics[mode]
        global_mean = self._global_mean
        names = list(statistics)
        dtype = torch.float32 if self.accelerator.device.type == "mps" else torch.float64  # sums of squares
        sums = torch.stack([torch.stack([total, count]).to(dtype) for total, count in statistics.values()])
        sums = dict(zip(names, self.accelerator.reduce(sums, reduction="sum").tolist(), strict=True))
        for name in ("margin", "preference_accuracy", "identical_frac", "tie_frac"):
            total, count = sums[name]
            if name != "tie_frac" or count:  # tie_frac only where rewards are given
                metrics[f"pbsd/{name}"].append(total / count if count else float("nan"))
        corr_count = sums["corr_x"][1]
        if self._has_reward_funcs and corr_count:
            corr = {key: sums[f"corr_{key}"][0] for key in ("x", "y", "xx", "yy", "xy")}
            metrics["pbsd/weight_reward_corr"].append(pearson_from_sums(corr, corr_count))
        metrics["pbsd/log_ratio_teacher_samples"].append(global_mean(teacher_log_ratios, has_teacher))
        metrics["pbsd/log_ratio_student_samples"].append(global_mean(student_log_ratios))
        metrics["pbsd/kl_student_teacher"].append(global_mean(student_kl))

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # Check the checkpoint before anything of it is loaded, so that a bad file fails with its name
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: transformers raises its own error
        if isinstance(checkpoint, (str, os.PathLike)):
            check_checkpoint(checkpoint, self._checkpoint_info())
            if self.teacher.kind == "ema":  # memory-mapped: the shapes are read, not the tensors
                path = os.path.join(checkpoint, TEACHER_STATE_FILE)
                self.teacher.check_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True), path)
        # A `train()` interrupted mid-step (Ctrl-C in a notebook) leaves that step's partial metrics, completions
        # table, pair table and buffered generation batch behind: a new run starts without them, as a new trainer
        # would (the Trainer builds a new `TrainerState` too, so the token counts restart with it).
        for metrics in self._metrics.values():
            metrics.clear()
        for logs in self._logs.values():
            for values in logs.values() if isinstance(logs, dict) else [logs]:
                values.clear()
        self._pair_table.clear()
        self._teacher_tokens_seen = 0
        self._step, self._buffered_inputs = 0, None
        if self._teacher_pool is not None:  # a resume restores the checkpoint's counters
            self._teacher_pool.visits.clear()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _checkpoint_info(self) -> dict:
        return checkpoint_info(self.teacher.kind, self.teacher.is_peft)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self.teacher.state_dict()  # collective under ZeRO-3: every process calls it
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self._teacher_pool is not None:  # a gather: every process calls it
            save_pool_state(self._teacher_pool, folder, self.accelerator, self.args.should_save)
        if self.args.should_save:
            if state is not None:
                torch.save(state, os.path.join(folder, TEACHER_STATE_FILE))
            write_checkpoint_info(folder, self._checkpoint_info())

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._teacher_pool is not None:
            load_pool_state(self._teacher_pool, checkpoint, self.accelerator)
        if checkpoint is None or self.teacher.kind != "ema":
            return
        path = os.path.join(checkpoint, TEACHER_STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {TEACHER_STATE_FILE}: it was not written by a PBSD run with an EMA teacher, so "
                "the teacher cannot be restored. Resume from a PBSD checkpoint or start a new run."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{path} cannot be read ({type(err).__name__}: {err}); it is corrupt or truncated. Resume from an "
                "earlier checkpoint."
            ) from err
        self.teacher.load_state_dict(state, source=path)
