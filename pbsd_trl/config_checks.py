"""The checks `PBSDConfig` runs at construction: each refuses, with what to change, a setting that would fail later
or silently train something other than what was asked."""

import math
import numbers
import string
import warnings
from dataclasses import fields

from trl import GRPOConfig

from .loss import LOSS_TYPES, PAIR_LABELS, PAIRINGS, TEACHER_WEIGHTINGS


_CHOICES = {
    "pair_labels": PAIR_LABELS,
    "tie_policy": ("role", "drop"),
    "pairing": PAIRINGS,
    "teacher_weighting": TEACHER_WEIGHTINGS,
    "pbsd_loss_type": LOSS_TYPES,
    "teacher_model_kind": ("base", "live", "ema"),
    "teacher_samples_from": ("teacher", "live"),
}

# Largest accepted `pbsd_beta`: the margin is β times a difference of sequence log-ratios (sums over tokens); far
# beyond 1 the logistic loss saturates at once and β·σ(-m) gradients overflow float32 (1e30 gave grad-norm inf).
_MAX_PBSD_BETA = 1e3

# Float fields that must be finite: PBSD's own and those of GRPO/transformers that reach every update.
_FINITE_FIELDS = (
    "pbsd_beta",
    "reward_temperature",
    "label_smoothing",
    "teacher_update_rate",
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "reward_weights",
    "tool_call_timeout",
)

# GRPO fields that only shape GRPO's policy-gradient loss or advantages. PBSD's loss never reads them, so a value
# other than GRPO's default would be silently ignored: say so instead.
_GRPO_LOSS_ONLY_FIELDS = (
    "loss_type",
    "epsilon",
    "epsilon_high",
    "delta",
    "importance_sampling_level",
    "scale_rewards",
    "multi_objective_aggregation",
    "off_policy_mask_threshold",
    "sapo_temperature_neg",
    "sapo_temperature_pos",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "use_bias_correction_kl",
)


def template_placeholders(template: str) -> set[str]:
    """Names of the `{…}` fields in a `str.format` template (raises `ValueError` on a malformed one)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_config(args) -> None:
    """Every check, the most basic first; fills in `num_teacher_generations`."""
    check_choices(args)
    check_types_and_ranges(args)
    check_teacher_prompts(args)
    check_loss_variant(args)
    check_teacher_generations(args)
    check_grpo_fields(args)


def check_choices(args) -> None:
    """Fields with a fixed set of values."""
    for name, choices in _CHOICES.items():
        value = getattr(args, name)
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def check_types_and_ranges(args) -> None:
    """Settings that would silently corrupt training: NaN/inf numbers, out-of-range rates, wrong types."""
    for name in ("num_teacher_generations", "max_teacher_prompt_length"):
        value = getattr(args, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"`{name}` must be an int or None, got {value!r} ({type(value).__name__}).")
    if isinstance(args.teacher_sync_steps, bool) or not isinstance(args.teacher_sync_steps, int):
        raise TypeError(f"`teacher_sync_steps` must be an int, got {args.teacher_sync_steps!r}.")
    for name in ("length_normalize", "allow_empty_privileged_context"):
        if not isinstance(getattr(args, name), bool):
            raise TypeError(
                f"`{name}` must be a bool, got {getattr(args, name)!r}: a string such as 'false' is truthy."
            )
    if args.use_fused_logprob_kernel is not None and not isinstance(args.use_fused_logprob_kernel, bool):
        raise TypeError(f"`use_fused_logprob_kernel` must be a bool or None, got {args.use_fused_logprob_kernel!r}.")
    for name in ("privileged_context_column", "teacher_prompt_template"):
        if not isinstance(getattr(args, name), str) or not getattr(args, name):
            raise TypeError(f"`{name}` must be a non-empty string, got {getattr(args, name)!r}.")
    if args.privileged_context_column == "prompt":
        raise ValueError(
            "`privileged_context_column` is 'prompt', the student's prompt column: the teacher would see nothing "
            "the student does not. Point it at the column holding the privileged context."
        )

    # NaN is never a meaningful setting: one in any float field (GRPO's included) reaches the weights.
    for f in fields(args):
        value = getattr(args, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and math.isnan(v) for v in values):
            raise ValueError(f"`{f.name}` is NaN ({value!r}); give it a finite value.")
    for name in _FINITE_FIELDS:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(v).__name__}).")
            if not math.isfinite(v):
                raise ValueError(f"`{name}` must be finite, got {value!r}.")

    if not 0 < args.pbsd_beta <= _MAX_PBSD_BETA:
        raise ValueError(
            f"`pbsd_beta` must be in (0, {_MAX_PBSD_BETA:g}], got {args.pbsd_beta}. Sequence log-ratios are sums "
            "over tokens (often tens of nats), so beyond this the loss saturates on the first step and its "
            "gradient overflows; typical values are 0.01-1."
        )
    if not 0.0 <= args.label_smoothing < 0.5:
        raise ValueError(f"`label_smoothing` must be in [0, 0.5), got {args.label_smoothing}.")
    if not 0.0 < args.teacher_update_rate <= 1.0:
        raise ValueError(f"`teacher_update_rate` must be in (0, 1], got {args.teacher_update_rate}.")
    if args.teacher_sync_steps < 1:
        raise ValueError(f"`teacher_sync_steps` must be >= 1, got {args.teacher_sync_steps}.")
    if args.max_teacher_prompt_length is not None and args.max_teacher_prompt_length < 1:
        raise ValueError(f"`max_teacher_prompt_length` must be positive, got {args.max_teacher_prompt_length}.")
    # GRPO's sampling settings that PBSD's scoring divides or samples by (GRPO does not check them)
    if not args.temperature > 0:
        raise ValueError(
            f"`temperature` must be > 0 (log-probs are computed from logits / temperature), got {args.temperature}."
        )
    if not 0 < args.top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {args.top_p}.")
    if args.learning_rate < 0:
        raise ValueError(f"`learning_rate` must be >= 0, got {args.learning_rate}.")
    if args.tool_call_timeout is not None and not args.tool_call_timeout > 0:
        raise ValueError(f"`tool_call_timeout` must be > 0 seconds or None, got {args.tool_call_timeout}.")


def check_teacher_prompts(args) -> None:
    """The teacher prompt's template, its token budget, and the pool's teacher."""
    if args.max_teacher_prompt_length is not None:
        room = args.max_teacher_prompt_length + (args.max_completion_length or 0)
        colocated = args.use_vllm and args.vllm_mode == "colocate"  # a server sets its own length
        if colocated and args.vllm_max_model_length is not None and room > args.vllm_max_model_length:
            raise ValueError(
                f"`max_teacher_prompt_length` ({args.max_teacher_prompt_length}) + `max_completion_length` "
                f"({args.max_completion_length}) = {room} tokens exceeds `vllm_max_model_length` "
                f"({args.vllm_max_model_length}): vLLM would reject the teacher prompts. Lower the budget to at "
                f"most {args.vllm_max_model_length - args.max_completion_length}."
            )
    if args.teacher_pool is not None and (args.teacher_model_kind != "base" or args.teacher_samples_from != "teacher"):
        raise ValueError(
            "`teacher_pool` holds samples of the fixed `base` teacher, drawn ahead of time: it needs "
            f"`teacher_model_kind='base'` and `teacher_samples_from='teacher'` (got {args.teacher_model_kind!r} "
            f"and {args.teacher_samples_from!r}). A live or EMA teacher changes during training."
        )

    try:
        placeholders = template_placeholders(args.teacher_prompt_template)
    except ValueError as err:
        raise ValueError(f"`teacher_prompt_template` is not a valid format string: {err}") from err
    missing = {"prompt", "privileged_context"} - placeholders
    unknown = placeholders - {"prompt", "privileged_context"}
    if missing or unknown:
        raise ValueError(
            "`teacher_prompt_template` must contain exactly the placeholders {prompt} and {privileged_context}"
            + (f"; missing: {sorted(missing)}" if missing else "")
            + (f"; unknown: {sorted(unknown)} (escape literal braces as {{{{ and }}}})" if unknown else "")
            + f". Got {args.teacher_prompt_template!r}."
        )


def check_loss_variant(args) -> None:
    """Combinations of the loss fields that have no meaning."""
    if args.pairing == "union" and args.pair_labels == "role" and args.pbsd_loss_type != "kl_regularized_pg":
        raise ValueError(
            "`pairing='union'` pairs every two samples of a prompt, two student samples included, which no role "
            "orders: set `pair_labels='reward'` or `'soft'`, or use `pairing='matched'` / `'all'`."
        )
    if args.teacher_weighting == "tilted" and args.pair_labels != "role":
        raise ValueError(
            "`teacher_weighting='tilted'` weights the teacher sample of role-labelled pairs; with "
            f"`pair_labels={args.pair_labels!r}` the rewards already order the pairs. Use one or the other."
        )
    if args.pbsd_loss_type == "kl_regularized_pg":
        if args.pairing != "union" or args.teacher_weighting != "uniform":
            raise ValueError(
                "`pbsd_loss_type='kl_regularized_pg'` is a policy gradient over every two student samples of a "
                "prompt: set `pairing='union'` (its partner table) with `teacher_weighting='uniform'` (got "
                f"{args.pairing!r}, {args.teacher_weighting!r}); `pair_labels` is not used."
            )
    elif args.pbsd_loss_type != "sigmoid" and args.pair_labels != "role":
        raise ValueError(
            f"`pbsd_loss_type={args.pbsd_loss_type!r}` is a diagnostic arm of the role-labelled loss (its teacher "
            f"sample is always y⁺); set `pair_labels='role'` (got {args.pair_labels!r})."
        )
    if not args.reward_temperature > 0:
        raise ValueError(f"`reward_temperature` must be > 0, got {args.reward_temperature}.")


def check_teacher_generations(args) -> None:
    """Teacher samples per prompt (default: `num_generations`) against the pairing and the backend."""
    num_student = args.num_generations
    if args.num_teacher_generations is None:
        args.num_teacher_generations = num_student
    if not 1 <= args.num_teacher_generations <= num_student:
        raise ValueError(
            f"`num_teacher_generations` ({args.num_teacher_generations}) must be between 1 and "
            f"`num_generations` ({num_student}): teacher samples ride on the rows of the student's prompt groups."
        )
    if args.pairing == "matched" and args.num_teacher_generations != num_student:
        raise ValueError(
            f"`pairing='matched'` pairs the i-th teacher sample with the i-th student sample, so "
            f"`num_teacher_generations` ({args.num_teacher_generations}) must equal `num_generations` "
            f"({num_student}). Set `pairing='all'` to use fewer teacher samples."
        )
    generate_every = args.steps_per_generation * args.num_iterations
    if args.pairing != "matched" and args.gradient_accumulation_steps % generate_every != 0:
        # The partner table is scored once per generation batch; a weight update before the batch is used up
        # would leave the partners' terms stale, and the gradient would not be the stated one.
        raise ValueError(
            f"`pairing='{args.pairing}'` scores each sample's partners once per generation batch, so that batch must be used "
            "up within one optimizer step: `gradient_accumulation_steps` "
            f"({args.gradient_accumulation_steps}) must be a multiple of `steps_per_generation` × "
            f"`num_iterations` ({args.steps_per_generation} × {args.num_iterations}). Set `num_iterations=1` "
            "and leave `steps_per_generation` unset (it then equals `gradient_accumulation_steps`), or use "
            "`pairing='matched'`."
        )
    if args.use_vllm and args.vllm_mode == "server" and args.num_teacher_generations != num_student:
        raise ValueError(
            "vLLM server mode samples `num_generations` completions per run of identical prompts, so "
            f"`num_teacher_generations` ({args.num_teacher_generations}) must equal `num_generations` "
            f"({num_student}) there. Use `vllm_mode='colocate'` or set them equal."
        )
    if (
        args.use_vllm
        and args.teacher_model_kind != "live"
        and args.teacher_samples_from == "teacher"
        and args.teacher_pool is None
    ):
        raise ValueError(
            f"The vLLM engine holds the policy's current weights only, so it cannot sample from the "
            f"'{args.teacher_model_kind}' teacher. Set `teacher_samples_from='live'` (teacher prompts sampled with "
            "the current weights, teacher log-probs still from the teacher weights), `teacher_model_kind='live'`, "
            "a `teacher_pool` of base-teacher samples drawn ahead of time, or `use_vllm=False`."
        )


def check_grpo_fields(args) -> None:
    """GRPO fields PBSD refuses, or ignores with a warning."""
    if args.beta != 0.0:
        raise ValueError(
            f"`beta` is GRPO's KL coefficient and would add a reference model that PBSD does not use (got "
            f"{args.beta}). PBSD's preference temperature is `pbsd_beta`; set `beta=0.0`."
        )
    if args.use_vllm and args.vllm_importance_sampling_correction:
        raise ValueError(
            "`vllm_importance_sampling_correction=True` reweights GRPO's per-token policy-gradient loss by the "
            "trainer/vLLM probability ratio; PBSD's pairwise loss has no such term to reweight. Leave it False "
            "(PBSDConfig's default)."
        )
    if args.sync_ref_model:
        raise ValueError(
            "`sync_ref_model` syncs GRPO's reference model, which PBSD does not use. For a moving teacher set "
            "`teacher_model_kind='ema'` (with `teacher_update_rate` and `teacher_sync_steps`)."
        )
    defaults = {f.name: f.default for f in fields(GRPOConfig)}
    ignored = [name for name in _GRPO_LOSS_ONLY_FIELDS if getattr(args, name) != defaults[name]]
    if ignored:
        warnings.warn(
            f"PBSDConfig ignores GRPO loss fields {ignored}: PBSD optimizes its own pairwise loss. Remove them "
            "to silence this warning.",
            UserWarning,
            stacklevel=5,  # the user's PBSDConfig(...): through __init__, __post_init__ and check_config
        )
    if args.num_iterations != 1:
        warnings.warn(
            f"`num_iterations={args.num_iterations}` reuses each batch of samples for several updates; PBSD's "
            "pairwise loss is applied to them without off-policy correction.",
            UserWarning,
            stacklevel=5,  # the user's PBSDConfig(...): through __init__, __post_init__ and check_config
        )
