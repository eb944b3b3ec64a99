"""PBSDConfig validation: bad settings fail at construction with a message that says what to change."""

import warnings

import pytest

from pbsd_trl import PBSDConfig


def make(**kwargs):
    base = dict(
        output_dir="/tmp/pbsd-config-test",
        per_device_train_batch_size=4,
        num_generations=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
    )
    base.update(kwargs)
    return PBSDConfig(**base)


def test_defaults_follow_the_paper():
    args = make()
    assert (args.pair_labels, args.tie_policy, args.pairing, args.teacher_model_kind) == (
        "role",
        "role",
        "matched",
        "base",
    )
    assert args.num_teacher_generations == args.num_generations == 4
    assert args.length_normalize is False and args.label_smoothing == 0.0 and args.beta == 0.0


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{prompt} only", "missing: ['privileged_context']"),
        ("{privileged_context} only", "missing: ['prompt']"),
        ("{prompt} {privileged_context} {answer}", "unknown: ['answer']"),
        ("{prompt} {privileged_context", "not a valid format string"),
    ],
)
def test_template_placeholders_are_checked(template, fragment):
    with pytest.raises(ValueError, match="teacher_prompt_template") as err:
        make(teacher_prompt_template=template)
    assert fragment in str(err.value)


def test_literal_braces_are_allowed_when_escaped():
    args = make(teacher_prompt_template='{prompt}\nJSON like {{"a": 1}}\n{privileged_context}')
    assert args.teacher_prompt_template.format(prompt="p", privileged_context="c") == 'p\nJSON like {"a": 1}\nc'


@pytest.mark.parametrize(
    "field, value",
    [
        ("pair_labels", "score"),
        ("tie_policy", "random"),
        ("pairing", "cross"),
        ("teacher_model_kind", "frozen"),
        ("teacher_samples_from", "student"),
        ("teacher_weighting", "softmax"),
        ("pbsd_loss_type", "ipo"),
    ],
)
def test_unknown_choices(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be one of"):
        make(**{field: value})


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(pbsd_beta=0.0), "pbsd_beta"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(teacher_update_rate=0.0), "teacher_update_rate"),
        (dict(teacher_sync_steps=0), "teacher_sync_steps"),
        (dict(max_teacher_prompt_length=0), "max_teacher_prompt_length"),
        (dict(num_teacher_generations=2), "must equal `num_generations`"),
        (dict(num_teacher_generations=5, pairing="all"), "between 1 and"),
        (dict(beta=0.04), "pbsd_beta"),
        (dict(sync_ref_model=True), "teacher_model_kind='ema'"),
        (dict(pairing="union"), "pairing='union'` pairs every two samples"),
        (dict(pairing="union", pair_labels="soft", num_iterations=2), "multiple"),
        (dict(teacher_weighting="tilted", pair_labels="soft"), "Use one or the other"),
        (dict(pbsd_loss_type="teacher_sft", pair_labels="reward"), "diagnostic arm"),
        (dict(pbsd_loss_type="kl_regularized_pg"), "policy gradient over every two student samples"),
        (dict(pair_labels="soft", reward_temperature=0.0), "reward_temperature"),
        (dict(pair_labels="soft", reward_temperature=float("inf")), "reward_temperature"),
    ],
)
def test_invalid_values(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        make(**kwargs)
    assert fragment in str(err.value)


def test_fewer_teacher_samples_with_all_pairing():
    assert make(pairing="all", num_teacher_generations=1).num_teacher_generations == 1


def test_grpo_loss_fields_warn_that_they_are_ignored():
    with pytest.warns(UserWarning, match="ignores GRPO loss fields \\['loss_type', 'epsilon'\\]"):
        make(loss_type="grpo", epsilon=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make()  # no warning with defaults


@pytest.mark.parametrize(
    "kwargs, uses_rewards",
    [
        (dict(), False),
        (dict(pbsd_loss_type="teacher_sft"), False),
        (dict(pair_labels="reward"), True),
        (dict(pairing="union", pair_labels="soft", num_teacher_generations=2), True),
        (dict(teacher_weighting="tilted", reward_temperature=0.5), True),
        (dict(pairing="union", pbsd_loss_type="kl_regularized_pg", num_teacher_generations=1), True),
    ],
)
def test_reward_aware_variants_are_accepted_and_say_whether_the_loss_reads_rewards(kwargs, uses_rewards):
    assert make(**kwargs).uses_rewards_in_loss is uses_rewards
