"""The methods the learning benchmarks compare, each a real trainer: GRPO (`trl.GRPOTrainer`), OPSD and SDFT
(`trl.experimental.sdft.SDFTTrainer`) and the PBSD variants (`pbsd_trl.PBSDTrainer`), their fixed settings and tuning
grids (learning rate x one knob per method), the PBSD ablations, and how a method's configuration becomes a trainer."""

import warnings

from harness.budgets import budgeted_run_settings


HEADLINE_PBSD = "PBSD"  # the paper's loss: the ablations, the teacher pool and the diagnostic arms build on it
PBSD_METHODS = (HEADLINE_PBSD, "PBSD-soft", "PBSD-reward", "PBSD-tilted")
METHODS = ("GRPO", "OPSD", "SDFT", *PBSD_METHODS)


def is_pbsd(method: str) -> bool:
    """PBSDTrainer methods: teacher samples every step, PBSD's costs and the PBSD side of the verdicts."""
    return method in PBSD_METHODS


# τ in reward units (rewards in [0, 1]): a correct-vs-wrong pair targets p = σ(1/0.5) = 0.88 with soft labels, and a
# correct teacher sample weighs e² ≈ 7.4 times a wrong one with tilted weights
REWARD_TEMPERATURE = 0.5


# Settings every configuration of a method shares (not tuned).
METHOD_FIXED = {
    "GRPO": {},
    "OPSD": {"distillation_mode": "full_logits", "teacher_model_kind": "base"},
    "SDFT": {"teacher_model_kind": "base"},  # TRL's SDFT loss defaults: topk_logits, top-100, IS clip 2
    "PBSD": {"teacher_model_kind": "base", "pair_labels": "role"},
    "PBSD-soft": {
        "teacher_model_kind": "base",
        "pairing": "union",
        "pair_labels": "soft",
        "reward_temperature": REWARD_TEMPERATURE,
    },
    "PBSD-reward": {"teacher_model_kind": "base", "pairing": "union", "pair_labels": "reward", "tie_policy": "drop"},
    "PBSD-tilted": {
        "teacher_model_kind": "base",
        "pair_labels": "role",
        "teacher_weighting": "tilted",
        "reward_temperature": REWARD_TEMPERATURE,
    },
}


# PBSD ablations, applied on top of the headline PBSD configuration. `pbsd_beta_scale` multiplies its β.
ABLATIONS = {
    "G_T=2, pairing=all": {"num_teacher_generations": 2, "pairing": "all"},
    "reward labels, ties dropped": {"pair_labels": "reward", "tie_policy": "drop"},
    "length-normalized (β x 40)": {"length_normalize": True, "pbsd_beta_scale": 40.0},
    "reward labels, ties dropped, G_T=2 all": {
        "pair_labels": "reward",
        "tie_policy": "drop",
        "num_teacher_generations": 2,
        "pairing": "all",
    },
    "SFT on teacher samples only": {"pbsd_loss_type": "teacher_sft"},
    "student-sample weight constant": {"pbsd_loss_type": "constant_student_weight"},
    # the objective optimized directly (KL-regularized policy gradient, teacher as reference): tells the objective
    # from its estimators
    "KL-regularized policy gradient": {
        "pbsd_loss_type": "kl_regularized_pg",
        "pairing": "union",
        "num_teacher_generations": 1,
    },
}


# The loss's diagnostic arms among the ablations, and what PBSD within seed spread of the arm means
DIAGNOSTIC_ARMS = {
    "SFT on teacher samples only": "PBSD-role behaves as SFT on teacher samples here",
    "student-sample weight constant": "PBSD-role's per-pair student weight σ(−m) makes no difference here",
    "KL-regularized policy gradient": "PBSD-role learns as well as the objective optimized directly here",
}


DESCRIPTIONS = {
    "GRPO": "`trl.GRPOTrainer`, accuracy reward, `beta=0`",
    "OPSD": "`trl.experimental.sdft.SDFTTrainer` as OPSD-style KL self-distillation: the task's privileged teacher "
    "prompt, base (frozen initial) teacher, `distillation_mode=full_logits` over the whole vocabulary",
    "SDFT": "`SDFTTrainer` with SDFT's loss defaults (`topk_logits`, top-100, IS clip 2), base teacher, the task's "
    "teacher prompt",
    "PBSD": "`pbsd_trl.PBSDTrainer`, `pair_labels=role` (paper, Eq. 10), base teacher, G_S = G_T = 8, matched pairs",
    "PBSD-soft": "`PBSDTrainer`, every two samples of a prompt paired (`pairing=union`), soft reward labels "
    f"σ(Δr/τ), τ = {REWARD_TEMPERATURE}: the reward-tilted teacher as optimum",
    "PBSD-reward": "`PBSDTrainer`, `pairing=union`, hard reward labels 1[r_a > r_b], every tie dropped",
    "PBSD-tilted": "`PBSDTrainer`, role labels with each teacher sample's pairs weighted by "
    f"G_T·softmax(r/τ) over the prompt's teacher samples, τ = {REWARD_TEMPERATURE}",
}


COLORS = {
    "base": "gray",
    "GRPO": "tab:blue",
    "OPSD": "tab:orange",
    "SDFT": "tab:purple",
    "PBSD": "tab:green",
    "PBSD-soft": "tab:olive",
    "PBSD-reward": "tab:red",
    "PBSD-tilted": "tab:cyan",
}


def config_name(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def ablation_config(headline: dict, overrides: dict) -> dict:
    config = dict(headline)
    overrides = dict(overrides)
    scale = overrides.pop("pbsd_beta_scale", None)
    config.update(overrides)
    if scale is not None:
        config["pbsd_beta"] = round(headline.get("pbsd_beta", 0.1) * scale, 6)
    return config


def trainer_args(
    task: str, method: str, config: dict, settings: dict, seed: int, output_dir: str, fixed: dict | None = None
):
    """The TRL / pbsd-trl config object of `method` with `config` (learning rate and method fields) on `task`, on top
    of the method's fixed settings (`METHOD_FIXED[method]`, or `fixed` where given)."""
    from pbsd_trl.recipes.data.tasks import TASKS

    spec = TASKS[task]
    config = dict(config)
    common = budgeted_run_settings(
        output_dir,
        seed,
        settings["prompts_per_step"],
        settings["num_generations"],
        settings["max_completion_length"],
        config.pop("learning_rate"),
    )
    fields = {**(METHOD_FIXED[method] if fixed is None else fixed), **config}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        if method in ("OPSD", "SDFT"):
            from trl.experimental.sdft import SDFTConfig

            return SDFTConfig(**common, teacher_prompt_template=spec.teacher_prompt_template, **fields)
        if method == "GRPO":
            from trl import GRPOConfig

            return GRPOConfig(**common, pad_to_multiple_of=16, **fields)
        if is_pbsd(method):
            from pbsd_trl import PBSDConfig

            return PBSDConfig(
                **common, pad_to_multiple_of=16, teacher_prompt_template=spec.teacher_prompt_template, **fields
            )
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


def build_trainer(
    task: str,
    method: str,
    config: dict,
    settings: dict,
    seed: int,
    model,
    tokenizer,
    train_dataset,
    output_dir: str,
    callbacks,
    fixed: dict | None = None,
):
    """The real TRL / pbsd-trl trainer of `method` with `config` on `task` ([`trainer_args`])."""
    from pbsd_trl.recipes.data.tasks import TASKS

    args = trainer_args(task, method, config, settings, seed, output_dir, fixed)
    kwargs = dict(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        if method in ("OPSD", "SDFT"):
            from trl.experimental.sdft import SDFTTrainer

            return SDFTTrainer(**kwargs)
        from trl import GRPOTrainer

        from pbsd_trl import PBSDTrainer

        trainer_class = PBSDTrainer if is_pbsd(method) else GRPOTrainer
        return trainer_class(reward_funcs=list(TASKS[task].reward_funcs), **kwargs)


def teacher_samples_per_step(method: str, config: dict, settings: dict) -> int:
    """Teacher completions generated per step: PBSD's G_T per prompt (G_S when unset), 0 for the other methods."""
    if not is_pbsd(method):
        return 0
    g_t = config.get("num_teacher_generations") or settings["num_generations"]
    return settings["prompts_per_step"] * g_t


# Every method: learning rate x its own main knob, the same number of configurations each.
LEARNING_RATES = (1e-4, 3e-4)


# β scales the margin β·Δρ of sequence log-ratio differences, whose size differs per task: the β at which the
# median |margin| starts near 1 (the logistic loss's working range) is ≈0.03-0.07 on math and 0.3-0.5 on tool use.
# One grid for both tasks would leave the loss saturated on one of them or flat on the other, so β is per task.
PBSD_BETAS = {"math": (0.05, 0.1), "tool_use": (0.3, 0.5)}


KNOBS = {
    "GRPO": ("loss_type", ("dapo", "grpo")),  # TRL's default (token-level) vs the original sequence-level loss
    "OPSD": ("distillation_alpha", (0.0, 0.5)),  # forward KL (OPSD's scripts) vs JSD (OPSD's first release)
    "SDFT": ("distillation_alpha", (0.5, 1.0)),  # TRL's SDFT default vs reverse KL
    # β for every PBSD variant: it decides whether the loss saturates on a task, which a variant's own temperature
    # τ does not (τ only sets how strongly a reward difference is targeted), so τ stays fixed at 0.5
    **dict.fromkeys(PBSD_METHODS, ("pbsd_beta", PBSD_BETAS)),
}


def knob_values(method: str, task: str, knobs=None) -> tuple[str, tuple]:
    """`method`'s tuned knob and its values on `task` (a knob's values are one tuple, or one per task)."""
    knob, values = (knobs or KNOBS)[method]
    return knob, tuple(values[task] if isinstance(values, dict) else values)


def tuning_grid(method: str, task: str, learning_rates=LEARNING_RATES, knobs=None) -> list[dict]:
    """The configurations of `method` on `task`: every learning rate x every value of its knob, in a fixed order."""
    knob, values = knob_values(method, task, knobs)
    return [{"learning_rate": lr, knob: value} for lr in learning_rates for value in values]
