"""`PBSDConfig`: GRPO's configuration plus the fields of Preference-Based Self-Distillation."""

from dataclasses import dataclass, field

from trl import GRPOConfig

from .config_checks import check_config


DEFAULT_TEACHER_PROMPT_TEMPLATE = (
    "{prompt}\n\nHere is a reference solution to this problem:\n{privileged_context}\n\n"
    "After understanding the reference solution, solve the problem yourself."
)


@dataclass
class PBSDConfig(GRPOConfig):
    r"""
    Configuration class for [`PBSDTrainer`].

    Every [`~trl.GRPOConfig`] field keeps its meaning (generation, batching, vLLM, logging, …). The fields below add
    Preference-Based Self-Distillation: the student `π_θ(y|x)` is trained with the logistic loss
    `-log σ(m)`, `m = β·[(log π_θ(y⁺|x) - log π_T(y⁺|x,c)) - (log π_θ(y⁻|x) - log π_T(y⁻|x,c))]`, where `y⁺` is a
    sample of the teacher (the same network prompted with the privileged context `c`) and `y⁻` an on-policy student
    sample. GRPO's fields that only shape GRPO's own loss (`loss_type`, `epsilon`, `scale_rewards`, …) are ignored,
    with a warning when set; GRPO's KL coefficient `beta` must stay `0.0` (PBSD's temperature is `pbsd_beta`).

    Parameters:
        > Parameters that control the PBSD loss

        pbsd_beta (`float`, *optional*, defaults to `0.1`):
            Preference temperature β of the implicit reward `β·log(π_θ/π_T)` and of the reward-regularized
            objective `E[r] - β·KL(π‖π_T)`. Larger values make the loss saturate sooner. Not GRPO's `beta`. Must be
            finite, in `(0, 1000]`.
        pair_labels (`str`, *optional*, defaults to `"role"`):
            The target of each pair. `"role"`: the teacher sample is always preferred; this is the paper's literal
            loss (Eq. 10), whose fixed point is the teacher itself (the rewards never enter). `"reward"`: the sample
            with the higher reward (weighted sum of `reward_funcs`) is preferred; ties follow `tie_policy`.
            `"soft"`: the first sample is preferred with probability `σ((r_a - r_b)/reward_temperature)`, whose
            optimum is the reward-tilted teacher `π_T·exp(r/(pbsd_beta·reward_temperature))/Z`. `"reward"` and
            `"soft"` need a reward source (reward functions or an environment's reward).
        tie_policy (`str`, *optional*, defaults to `"role"`):
            With `pair_labels="reward"` or `"soft"`, what an equal-reward pair of a teacher and a student sample
            becomes: `"role"` (teacher preferred) or `"drop"` (excluded from the loss). Ties between two samples of
            the same role (`pairing="union"`) are always dropped with `"reward"`.
        num_teacher_generations (`int` or `None`, *optional*, defaults to `None`):
            Teacher samples per prompt, G_T. `None` means `num_generations` (G_S). With `pairing="matched"` it must
            equal G_S; with `"all"` or `"union"` any 1 ≤ G_T ≤ G_S works (the first G_T rows of each prompt group
            carry a teacher sample), except with vLLM in server mode, which needs G_T = G_S.
        pairing (`str`, *optional*, defaults to `"matched"`):
            Which samples of a prompt are paired. `"matched"`: the i-th teacher sample with the i-th student sample.
            `"all"`: every teacher sample with every student sample (G_T × G_S pairs). `"union"`: every two samples
            of the prompt, teacher or student (the pairs within the student samples carry the on-policy reward
            information, as GRPO's advantages do); needs `pair_labels="reward"` or `"soft"`. `"all"` and `"union"`
            need one extra no-grad scoring pass to supply the partner terms, which are exact only while no update
            happens between generation and loss: `gradient_accumulation_steps` must be a multiple of
            `steps_per_generation × num_iterations` (the default `steps_per_generation` is).
        teacher_weighting (`str`, *optional*, defaults to `"uniform"`):
            Weight of the pairs of each teacher sample, with `pair_labels="role"`. `"uniform"`: 1. `"tilted"`:
            `G_T·exp(r/τ)/Σ exp(r'/τ)` over the prompt's teacher samples (τ = `reward_temperature`), the
            self-normalized importance weights that turn teacher samples into samples of the reward-tilted teacher;
            needs a reward source. A large τ gives back `"uniform"`.
        reward_temperature (`float`, *optional*, defaults to `1.0`):
            Reward temperature τ of `pair_labels="soft"` and `teacher_weighting="tilted"`, in reward units. Must be
            finite and > 0.
        pbsd_loss_type (`str`, *optional*, defaults to `"sigmoid"`):
            `"sigmoid"`: the PBSD logistic loss. Two diagnostic arms, with `pair_labels="role"`, that tell what the
            loss does on a task: `"teacher_sft"` (SFT on the teacher samples: gradient `-β·∇log π_θ(y⁺|x)`) and
            `"constant_student_weight"` (the student sample's per-pair weight `σ(-m)` replaced by its batch mean).
            `"kl_regularized_pg"` optimizes the objective `E[r] - β·KL(π‖π_T)` directly, as a comparison: a policy
            gradient over the student samples with the reward `r - β·log(π_θ/π_T)` and the prompt's mean as baseline
            (needs `pairing="union"` and a reward source; `pair_labels` is unused, and the teacher samples are only
            scored and logged, so `num_teacher_generations=1` keeps their cost down).
        length_normalize (`bool`, *optional*, defaults to `False`):
            Divide each sequence log-ratio by its completion length (SimPO/IPO-style) instead of using the sum.
        label_smoothing (`float`, *optional*, defaults to `0.0`):
            Conservative-DPO smoothing ε: the loss becomes `-(1-ε)·log σ(m) - ε·log σ(-m)`. Must be in `[0, 0.5)`.

        > Parameters that control the teacher

        teacher_model_kind (`str`, *optional*, defaults to `"base"`):
            Weights of the teacher. `"base"`: the initial weights (with PEFT the adapter is disabled, without PEFT a
            frozen copy). `"live"`: the current weights under stop-gradient. `"ema"`: an exponential moving average
            of the student (a second adapter with PEFT, a second model without), saved in checkpoints.
        teacher_update_rate (`float`, *optional*, defaults to `0.01`):
            EMA rate α for `teacher_model_kind="ema"`: `θ_T ← (1-α)·θ_T + α·θ` every `teacher_sync_steps` steps.
        teacher_sync_steps (`int`, *optional*, defaults to `1`):
            Optimizer steps between two EMA updates of the teacher.
        privileged_context_column (`str`, *optional*, defaults to `"privileged_context"`):
            Dataset column with the privileged context `c` (a reference solution, a demonstration, tool docs). Must
            hold strings.
        teacher_prompt_template (`str`, *optional*, defaults to a reference-solution template):
            `str.format` template of the teacher prompt with exactly the fields `{prompt}` and
            `{privileged_context}`. For conversational prompts it is applied to the text of the last user turn, and
            the chat template is applied once, to the result.
        allow_empty_privileged_context (`bool`, *optional*, defaults to `False`):
            By default a `None` or empty privileged context raises an error naming the row. When `True`, such rows
            get a teacher prompt with an empty context (the teacher then knows no more than the student).
        max_teacher_prompt_length (`int` or `None`, *optional*, defaults to `None`):
            Token budget for a teacher prompt (e.g. to fit `vllm_max_model_length`). When a teacher prompt is longer,
            the privileged context is cut from its end until it fits, never the student prompt; each cut is counted in
            `pbsd/context_truncated_frac` and warned about once. A row whose teacher prompt does not fit even with an
            empty context is an error naming the row. `None` means no limit; teacher prompts longer than the model's
            positions (or `vllm_max_model_length`) are then an error naming the row, at construction for map-style
            datasets. In vLLM colocate mode,
            `max_teacher_prompt_length + max_completion_length` must not exceed `vllm_max_model_length` when both are
            set.
        teacher_samples_from (`str`, *optional*, defaults to `"teacher"`):
            Whose weights generate the teacher samples. `"teacher"`: the teacher weights (`teacher_model_kind`).
            `"live"`: the current policy weights, prompted with the teacher prompt; the only option with vLLM when the
            teacher is not `"live"`, since the vLLM engine holds the policy weights only. Teacher log-probs are always
            computed with the teacher weights.
        teacher_pool (`str` or `None`, *optional*, defaults to `None`):
            Folder of a teacher-sample pool built with `python -m pbsd_trl.scripts.build_teacher_pool` (see
            `pbsd_trl.pool`): K teacher samples per training row, drawn ahead of time from the `base` teacher with
            their teacher log-probs. Training steps then take `num_teacher_generations` samples per prompt from it
            (unused ones first on later visits) instead of generating and rescoring them; everything else is computed
            as without it. Needs `teacher_model_kind="base"` and `teacher_samples_from="teacher"`; a pool drawn from
            other weights, model configuration or precision, another tokenizer, teacher prompt or sampling settings is
            refused at construction, naming the difference. Student samples can then come from vLLM while the teacher
            stays the exact `base` teacher. Evaluation rows missing from the pool get online teacher samples.
        one_generation_pass (`bool`, *optional*, defaults to `True`):
            Draw the student and the teacher samples of a step in one `generate` call when they can share it: with
            the current weights (`teacher_model_kind="live"` or `teacher_samples_from="live"`), and for a PEFT
            student with the `base` or `ema` teacher (per-row adapters: the teacher rows with the adapter disabled, or
            with the EMA adapter). Only with
            transformers' `generate` (not vLLM, not continuous batching). The samples have the same distribution as
            with two calls (they are not the same draws: the random numbers are consumed in another order).
        teacher_logps_from_generation (`bool` or `None`, *optional*, defaults to `None`):
            With one generation pass whose teacher rows are sampled with the teacher's own weights (a `live` teacher,
            or the `base`/`ema` teacher of a PEFT student), take the teacher's log-probs of its samples from the
            logits of the decoding steps that drew them instead of scoring them again: the same function of the same
            weights, computed incrementally. `None` does so where the model computes in float32 without mixed
            precision (decoding and scoring then agree to float rounding); `True` also in bf16/fp16, where a KV-cached
            decode can differ from a full forward by more than the rounding of one; `False` always scores them.
        share_prompt_prefill (`bool`, *optional*, defaults to `True`):
            In transformers' `generate` calls (student, teacher, one generation pass), prefill each distinct prompt
            row of the batch once and repeat its KV cache for the prompt's samples, instead of prefilling every row
            (GRPO repeats each prompt G times, and teacher prompts are several times wider than student prompts).
            The same computation and, for the same seed, the same samples up to floating-point rounding of the
            prefill. Applies to decoder-only models with full-attention `DynamicCache` layers and text-only inputs;
            other calls are left as they are. On CPU, prompts of similar width are prefilled together (a student
            prompt is not run over a teacher prompt's width), and where every prompt of the call has as many samples
            its cache is kept once and attended to once per decoding step for all its samples (shared-prefix
            attention, the same attention up to rounding); a model whose attention is not plain full attention
            through transformers' `AttentionInterface` falls back to the repeated cache with a warning.

        > Parameters that control agent rollouts

        tool_call_timeout (`float` or `None`, *optional*, defaults to `None`):
            Seconds a tool call (`tools`, an environment's methods) may run; past them the model gets a tool error, as
            from a raising tool, and training goes on. `None`: no limit, as in GRPO.

        > Parameters that control the kernels

        use_fused_logprob_kernel (`bool` or `None`, *optional*, defaults to `None`):
            Score completions with pbsd-trl's plain-PyTorch fused log-prob kernel (no `[tokens, vocab]` logits).
            `False` uses TRL's fused LM head instead. `None` picks by device, as measured in `benchmarks/results/`:
            pbsd-trl's kernel everywhere except on CUDA, where TRL's Triton kernel is faster at equal memory.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS

    # GRPO defaults that PBSD changes, with their reason.
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Disable dropout so that the student and teacher log-probs of one step are computed by the same "
            "deterministic function (PBSD compares them directly)."
        },
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "Must stay False with vLLM: PBSD's pairwise loss has no per-token policy-gradient term for GRPO's "
            "importance-sampling ratio to reweight."
        },
    )

    # PBSD loss
    pbsd_beta: float = field(
        default=0.1,
        metadata={"help": "Preference temperature β of the implicit reward β·log(π_θ/π_T). Not GRPO's `beta`."},
    )
    pair_labels: str = field(
        default="role",
        metadata={"help": "How pairs are ordered: 'role' (teacher sample preferred, paper) or 'reward'."},
    )
    tie_policy: str = field(
        default="role",
        metadata={
            "help": "With pair_labels='reward', an equal-reward pair is labelled by 'role' or dropped ('drop')."
        },
    )
    num_teacher_generations: int | None = field(
        default=None,
        metadata={"help": "Teacher samples per prompt (G_T). None means num_generations."},
    )
    pairing: str = field(
        default="matched",
        metadata={"help": "'matched' (i-th teacher with i-th student sample) or 'all' (G_T × G_S pairs)."},
    )
    teacher_weighting: str = field(
        default="uniform",
        metadata={"help": "Weights of the teacher samples: 'uniform' or 'tilted' (self-normalized exp(r/τ))."},
    )
    reward_temperature: float = field(
        default=1.0,
        metadata={"help": "Reward temperature τ of pair_labels='soft' and teacher_weighting='tilted'."},
    )
    pbsd_loss_type: str = field(
        default="sigmoid",
        metadata={"help": "'sigmoid' (the PBSD loss) or a diagnostic arm: 'teacher_sft', 'constant_student_weight'."},
    )
    length_normalize: bool = field(
        default=False,
        metadata={"help": "Divide sequence log-ratios by completion length."},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Conservative-DPO label smoothing ε in [0, 0.5)."},
    )

    # Teacher
    teacher_model_kind: str = field(
        default="base",
        metadata={"help": "Teacher weights: 'base' (initial), 'live' (current, stop-gradient) or 'ema'."},
    )
    teacher_update_rate: float = field(
        default=0.01,
        metadata={"help": "EMA rate α of the 'ema' teacher: θ_T ← (1-α)θ_T + αθ."},
    )
    teacher_sync_steps: int = field(
        default=1,
        metadata={"help": "Optimizer steps between two EMA teacher updates."},
    )
    privileged_context_column: str = field(
        default="privileged_context",
        metadata={"help": "Dataset column holding the privileged context."},
    )
    teacher_prompt_template: str = field(
        default=DEFAULT_TEACHER_PROMPT_TEMPLATE,
        metadata={"help": "Teacher prompt template with the fields {prompt} and {privileged_context}."},
    )
    allow_empty_privileged_context: bool = field(
        default=False,
        metadata={"help": "Accept None/empty privileged contexts (teacher prompt with an empty context)."},
    )
    max_teacher_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Token budget of a teacher prompt; the privileged context is cut to fit, never the prompt."},
    )
    teacher_samples_from: str = field(
        default="teacher",
        metadata={"help": "Weights that sample the teacher completions: 'teacher' or 'live' (vLLM fallback)."},
    )
    teacher_pool: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a teacher-sample pool (pbsd_trl.scripts.build_teacher_pool) for the base teacher."
        },
    )
    one_generation_pass: bool = field(
        default=True,
        metadata={"help": "Draw student and teacher samples in one generate call when they can share weights."},
    )

    teacher_logps_from_generation: bool | None = field(
        default=None,
        metadata={
            "help": "Take the teacher's log-probs of its one-pass samples from the decoding logits. None (default): "
            "where the model computes in float32; True: also in mixed precision; False: score them."
        },
    )

    share_prompt_prefill: bool = field(
        default=True,
        metadata={"help": "Prefill each distinct prompt of a generate batch once and repeat its KV cache."},
    )

    # Agent rollouts
    tool_call_timeout: float | None = field(
        default=None, metadata={"help": "Seconds a tool call may run before the model gets a tool error (None: none)."}
    )

    # Kernels
    use_fused_logprob_kernel: bool | None = field(
        default=None,
        metadata={
            "help": "Use pbsd-trl's fused log-prob kernel; False uses TRL's fused LM head; None (default): pbsd-trl's "
            "kernel except on CUDA, where TRL's Triton head is faster."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_config(self)

    @property
    def uses_rewards_in_loss(self) -> bool:
        """Whether the loss reads the rewards (they are only logged otherwise)."""
        return (
            self.pair_labels != "role"
            or self.teacher_weighting == "tilted"
            or self.pbsd_loss_type == "kl_regularized_pg"
        )
