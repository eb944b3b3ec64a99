"""vLLM settings PBSD cannot serve fail at construction (PBSDConfig), before any engine or server is touched, with a
message naming the fields to change. These need no vLLM installed; the runs themselves are in `test_vllm*.py`."""

import pytest

from pbsd_trl import PBSDConfig


def make(**kwargs):
    base = dict(
        output_dir="/tmp/pbsd-vllm-config-test",
        per_device_train_batch_size=4,
        num_generations=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
        use_vllm=True,
    )
    base.update(kwargs)
    return PBSDConfig(**base)


@pytest.mark.parametrize("mode", ["colocate", "server"])
@pytest.mark.parametrize("kind", ["base", "ema"])
def test_fixed_teacher_cannot_sample_through_vllm(kind, mode):
    # The engine holds the policy's weights only: sampling from the base/EMA teacher there would silently be wrong
    with pytest.raises(ValueError, match=f"cannot sample from the '{kind}' teacher") as err:
        make(teacher_model_kind=kind, vllm_mode=mode)
    assert "teacher_samples_from='live'" in str(err.value)
    # ...and each way out that the message names constructs
    make(teacher_model_kind=kind, vllm_mode=mode, teacher_samples_from="live")
    make(teacher_model_kind="live", vllm_mode=mode)
    make(teacher_model_kind=kind, vllm_mode=mode, use_vllm=False)


def test_server_mode_needs_as_many_teacher_as_student_samples():
    with pytest.raises(ValueError, match=r"`num_teacher_generations` \(2\) must equal `num_generations` \(4\)"):
        make(teacher_model_kind="live", vllm_mode="server", pairing="all", num_teacher_generations=2)
    make(teacher_model_kind="live", vllm_mode="colocate", pairing="all", num_teacher_generations=2)


def test_teacher_prompt_budget_must_fit_the_colocated_engine():
    live = dict(teacher_model_kind="live", max_completion_length=64, vllm_max_model_length=512)
    with pytest.raises(
        ValueError, match=r"`max_teacher_prompt_length` \(449\) \+ `max_completion_length` \(64\)"
    ) as err:
        make(max_teacher_prompt_length=449, **live)
    assert "at most 448" in str(err.value)
    make(max_teacher_prompt_length=448, **live)
    make(max_teacher_prompt_length=449, **{**live, "vllm_mode": "server"})  # the server sets its own length
