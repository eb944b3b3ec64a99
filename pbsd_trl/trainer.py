"""`PBSDTrainer`: GRPO's sampling loop, PBSD's pairwise loss against a privileged-context teacher."""

import logging
import textwrap

import torch
from accelerate.utils import gather, gather_object
from datasets import IterableDataset
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head

from .agent import AgentRollouts, checked_rollout_func
from .checkpoint_mixin import PBSDCheckpoints
from .config import PBSDConfig
from .grpo_features import GRPOLossFeatures
from .logprobs import (
    add_pbsd_logprob_head,
    reset_forward_patches,
    right_pad_to,
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
from .pool.trainer_pool import TeacherPoolSamples
from .rewards.guard import guard_environment_rewards, guard_reward_funcs
from .rewards.trainer_rewards import RewardTables
from .scoring import SequenceScoring
from .teacher.batch import TeacherBatch, TeacherDraw, TeacherRows
from .teacher.generation import TeacherGeneration
from .teacher.prompts import (
    ROW_INDEX_COLUMN,
    TeacherPromptBuilder,
    teacher_position_limit,
)
from .teacher.weights import TeacherEMACallback, TeacherWeights
from .trainer_checks import (
    check_privileged_column,
    check_teacher_prompts,
    check_tokenizer,
    check_trainer_arguments,
    named_datasets,
    reward_use,
)


logger = logging.getLogger(__name__)


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


class PBSDTrainer(
    GRPOLossFeatures,
    AgentRollouts,
    TeacherGeneration,
    TeacherPoolSamples,
    SequenceScoring,
    RewardTables,
    PBSDCheckpoints,
    GRPOTrainer,
):
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
        self._adopt_reward_sources(len(reward_funcs), reward_failures)
        is_peft = hasattr(self.model, "peft_config")
        self._setup_teacher_weights(is_peft, rollout_func)
        self._setup_teacher_prompts()
        self._last_rewards_per_func = None
        self._pair_table = {}  # mode -> the generation batch's pair table, for pairings across rows
        self._teacher_tokens_seen = 0
        self._setup_teacher_generation(args, train_dataset, eval_dataset, is_peft)

    def _adopt_reward_sources(self, num_given: int, reward_failures: list) -> None:
        """Guard an environment's `get_reward` (GRPO appends it after the given functions) like the reward functions,
        and drop the placeholder that let GRPO construct without any."""
        args = self.args
        self.reward_funcs[num_given:] = guard_environment_rewards(
            self.reward_funcs[num_given:], self.reward_func_names[num_given:], reward_failures
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

    def _setup_teacher_weights(self, is_peft: bool, rollout_func) -> None:
        """The teacher's weights ([`TeacherWeights`]) and the scoring heads of both models (GRPO has already added TRL's
        fused head to the student)."""
        args = self.args
        # (a non-live teacher with vLLM and `teacher_samples_from="teacher"` is refused by PBSDConfig, before an
        # engine is built)
        if self.use_vllm and args.teacher_samples_from == "live" and args.teacher_model_kind != "live":
            logger.warning(
                "Teacher samples come from the current weights through vLLM (teacher_samples_from='live'); they are "
                "scored with the '%s' teacher weights.",
                args.teacher_model_kind,
            )

        if args.use_fused_logprob_kernel is None:
            # TRL's Triton kernel beats ours on CUDA; ours beats its torch fallback elsewhere (benchmarks/results/)
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

    def _setup_teacher_prompts(self) -> None:
        """The teacher-prompt builder, and every teacher prompt of a map-style dataset checked once."""
        args = self.args
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
