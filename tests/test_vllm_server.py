"""TRL's vLLM server mode with PBSD: the test starts the server that `trl vllm-serve` starts, on 127.0.0.1 and a free
port, PBSD draws its student and teacher samples through it for 2 steps, and the server is stopped by its PID.

Weight sync in server mode needs CUDA: TRL pushes the weights over vLLM's NCCL weight-transfer engine, and refuses a
CPU trainer at construction (`test_server_weight_sync_needs_cuda`). On CPU the generation test therefore runs without
weight pushes (`vllm_support.without_server_weight_sync`), and the server keeps the initial weights throughout:
its samples' log-probs are the initial model's, in both steps. Weight sync in server mode is verified on a GPU only.
"""

import pytest
from testing_utils import TEMPLATE
from transformers import AutoModelForCausalLM
from vllm_support import (
    MAX_MODEL_LEN,
    GenerationRecorder,
    group_alive,
    make_model_dir,
    requires_vllm,
    running_server,
    server_model_id,
    without_server_weight_sync,
)

from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import load_tokenizer


pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

STEPS = 2
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("vllm-server-model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with running_server(model_dir, MAX_MODEL_LEN, str(log)) as (base_url, proc):
        yield base_url, proc
    # stopped by its PID: nothing of it is left
    assert proc.returncode is not None and not group_alive(proc.pid)


def pbsd_args(tmp_path, base_url, **kwargs):
    from pbsd_trl import PBSDConfig

    return PBSDConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=STEPS,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        teacher_prompt_template=TEMPLATE,
        teacher_model_kind="live",
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=base_url,
        vllm_server_timeout=60,
        **kwargs,
    )


def test_server_serves_the_model(server, model_dir):
    base_url, proc = server
    assert proc.poll() is None
    assert server_model_id(base_url) == model_dir


def test_server_weight_sync_needs_cuda(server, model_dir, tmp_path):
    from pbsd_trl import PBSDTrainer

    base_url, _ = server
    with pytest.raises(NotImplementedError, match="needs a CUDA device"):
        PBSDTrainer(
            model_dir,
            args=pbsd_args(tmp_path, base_url),
            train_dataset=make_math_dataset("train", n=16, seed=0),
            processing_class=load_tokenizer(model_dir),
        )


def test_pbsd_generates_through_server(server, model_dir, tmp_path):
    from pbsd_trl import PBSDTrainer

    base_url, _ = server
    tokenizer = load_tokenizer(model_dir)
    initial = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with without_server_weight_sync():
        trainer = PBSDTrainer(
            model_dir,
            args=pbsd_args(tmp_path, base_url),
            train_dataset=make_math_dataset("train", n=16, seed=0),
            processing_class=tokenizer,
        )
        recorder = GenerationRecorder(trainer, reference=initial)
        trainer.train()
    assert trainer.state.global_step == STEPS
    assert sum("pbsd/margin" in entry for entry in trainer.state.log_history) == STEPS
    # Per step: the student prompts, then the teacher prompts (with the privileged context), 8 samples each
    assert len(recorder.calls) == 2 * STEPS
    for step in range(STEPS):
        student, teacher = recorder.calls[2 * step], recorder.calls[2 * step + 1]
        assert not any("Reference solution" in tokenizer.decode(p) for p in student["prompt_ids"])
        assert all("Reference solution" in tokenizer.decode(p) for p in teacher["prompt_ids"])
        assert len(student["completion_ids"]) == len(teacher["completion_ids"]) == 8
    # The server sampled with the model it loaded (float32), in both steps, since nothing was pushed to it
    errors = [call["logps_error"] for call in recorder.calls]
    print(f"per generation call, max |server - initial model| sampled-token log-prob: {errors}")
    assert max(errors) < TOLERANCE
