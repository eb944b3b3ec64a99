"""The checks `PBSDConfig` runs at construction (`pbsd_trl/config_checks.py`): every bad setting fails with an error
naming its field, before any model is built.

Each test asserts the error type and that the message names the field; the settings that are accepted are checked to
stay accepted. The other construction checks of the config, with what their messages say to change, are in
test_config.py.
"""

import pytest
from testing_utils import TEMPLATE, tiny_pbsd_config


INF, NAN = float("inf"), float("nan")


def make_args(output_dir, **kwargs):
    return tiny_pbsd_config(output_dir, **{"teacher_prompt_template": TEMPLATE, "max_steps": 1, **kwargs})


# ---- settings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, error",
    [
        ("pbsd_beta", INF, ValueError),
        ("pbsd_beta", -INF, ValueError),
        ("pbsd_beta", NAN, ValueError),
        ("pbsd_beta", 1e30, ValueError),
        ("pbsd_beta", True, TypeError),
        ("teacher_update_rate", NAN, ValueError),
        ("teacher_update_rate", INF, ValueError),
        ("label_smoothing", NAN, ValueError),
        ("label_smoothing", -INF, ValueError),
        ("learning_rate", NAN, ValueError),
        ("learning_rate", INF, ValueError),
        ("learning_rate", -1.0, ValueError),
        ("temperature", 0.0, ValueError),
        ("temperature", NAN, ValueError),
        ("top_p", 0.0, ValueError),
        ("weight_decay", INF, ValueError),
        ("max_grad_norm", NAN, ValueError),  # any NaN, also in a field PBSD does not name
        ("reward_weights", [1.0, NAN], ValueError),
        ("reward_weights", [INF], ValueError),
        ("num_teacher_generations", 4.0, TypeError),
        ("teacher_sync_steps", 1.5, TypeError),
        ("max_teacher_prompt_length", True, TypeError),
        ("length_normalize", "false", TypeError),
        ("allow_empty_privileged_context", "no", TypeError),
        ("use_fused_logprob_kernel", "yes", TypeError),
        ("privileged_context_column", "", TypeError),
        ("privileged_context_column", "prompt", ValueError),
    ],
)
def test_bad_setting_names_the_field(tmp_path, field, value, error):
    with pytest.raises(error, match=f"`{field}`"):
        make_args(tmp_path, **{field: value})


@pytest.mark.parametrize(
    "stale",
    [
        dict(steps_per_generation=2),
        dict(num_iterations=2),
        dict(gradient_accumulation_steps=3, steps_per_generation=2),
    ],
)
def test_all_pairing_with_stale_partners_is_refused(tmp_path, stale):
    """An update between scoring the partner table and using it would make the pairwise gradient inexact."""
    with pytest.raises(ValueError, match="pairing='all'.*gradient_accumulation_steps") as err:
        make_args(tmp_path, pairing="all", num_teacher_generations=2, **stale)
    assert "steps_per_generation" in str(err.value) and "num_iterations" in str(err.value)


@pytest.mark.parametrize(
    "aligned",
    [
        dict(gradient_accumulation_steps=2),
        dict(gradient_accumulation_steps=4, steps_per_generation=2),
        dict(gradient_accumulation_steps=2, num_iterations=2, steps_per_generation=1),
    ],
)
def test_all_pairing_with_one_update_per_generation_is_accepted(tmp_path, aligned):
    args = make_args(tmp_path, pairing="all", num_teacher_generations=2, **aligned)
    assert args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) == 0


def test_teacher_budget_past_vllm_max_model_length(tmp_path):
    pytest.importorskip("vllm")
    with pytest.raises(ValueError, match="vllm_max_model_length"):
        make_args(
            tmp_path,
            use_vllm=True,
            vllm_mode="colocate",
            vllm_max_model_length=64,
            max_teacher_prompt_length=60,
            teacher_samples_from="live",
        )
