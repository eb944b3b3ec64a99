"""Shared pieces of the distributed and checkpoint tests: a tiny model on disk, a fixed-length dataset, and a
`PBSDTrainer` whose generation is a deterministic function of the prompt.

Both the student's and the teacher's samples go through `_generate` -> `_generate_single_turn`; replacing the latter
with a function of (prompt ids, position in the prompt group) makes a 1-process run and a 2-process run over the same
global batch see exactly the same completions. Every prompt, teacher prompt and completion has the same token length,
so padding (and with it RoPE positions under left padding) is identical whatever the per-process batch.
"""

import json
import os
import random
import sys
import zlib

from pbsd_trl import PBSDConfig, PBSDTrainer
from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model, load_tokenizer


COMPLETION_LENGTH = 6  # tokens, the last one EOS
_PROMPT_SHAPE = (7, 43, 3)  # (len(prompt text), len(privileged context), len(answer)): the most common shape


def make_model_dir(path: str, tied: bool = True) -> str:
    """Save the ~10k-parameter random Qwen2 and its tokenizer under `path` (idempotent).

    `tied=False` gives the model its own `lm_head`: under ZeRO-3 that weight is then partitioned and released outside
    the head's (never called) forward, so the fused log-prob op must gather it itself, in forward and backward.
    """
    if not os.path.exists(os.path.join(path, "config.json")):
        tok = build_char_tokenizer()
        model = build_random_model(tok, seed=0, tie_word_embeddings=tied)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def make_dataset(n: int = 16):
    """Math rows whose prompts, privileged contexts and answers all have the same length."""
    from pbsd_trl.recipes.data.math_task import make_math_dataset

    ds = make_math_dataset("train", n=400, seed=0)
    ds = ds.filter(
        lambda r: (len(r["prompt"][0]["content"]), len(r["privileged_context"]), len(r["answer"])) == _PROMPT_SHAPE
    )
    return ds.select(range(n))


def digit_reward(completions, answer, **kwargs):
    """A deterministic, non-constant reward: the fraction of the answer's digits found in the completion."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in t for ch in a) / len(a) for t, a in zip(texts, answer, strict=True)]


class DeterministicPBSDTrainer(PBSDTrainer):
    """`PBSDTrainer` with sampling replaced by a fixed function of the prompt ids and the row's index in its group."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        tok = self._tokenizer
        pool = tok.convert_tokens_to_ids(list("0123456789+-=#;>"))
        eos = tok.eos_token_id
        n, rank = len(prompt_ids), self.accelerator.process_index
        # Groups of `num_generations` identical prompts start at global multiples of the group size
        group = self.num_generations if self.model.training else self.num_generations_eval
        completions = []
        for j, ids in enumerate(prompt_ids):
            k = (rank * n + j) % group
            rng = random.Random(zlib.crc32(f"{[int(i) for i in ids]}|{k}".encode()))
            completions.append([rng.choice(pool) for _ in range(COMPLETION_LENGTH - 1)] + [eos])
        return completions, None


def make_config(output_dir: str, per_device_batch: int, kind: str, **overrides) -> PBSDConfig:
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        num_generations=4,
        max_completion_length=COMPLETION_LENGTH,
        max_steps=3,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        teacher_model_kind=kind,
        teacher_update_rate=0.5,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        seed=42,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return PBSDConfig(**kwargs)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def build_trainer(
    model_dir, output_dir, per_device_batch, kind, peft, reward_funcs=None, trainer_cls=None, **overrides
):
    args = make_config(output_dir, per_device_batch, kind, **overrides)
    return (trainer_cls or DeterministicPBSDTrainer)(
        model=model_dir,
        reward_funcs=[digit_reward] if reward_funcs is None else reward_funcs,
        args=args,
        train_dataset=make_dataset(),
        processing_class=load_tokenizer(model_dir),
        peft_config=lora_config() if peft else None,
    )


def step_logs(trainer) -> dict[str, list[float]]:
    """Per-step `loss` and a few PBSD metrics from the log history."""
    keys = ("loss", "pbsd/margin", "pbsd/kl_student_teacher", "pbsd/teacher_reward", "pbsd/student_reward")
    rows = [h for h in trainer.state.log_history if "loss" in h]
    return {key: [h.get(key) for h in rows] for key in keys} | {"step": [h["step"] for h in rows]}


def write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def finish_launched_run() -> None:
    """End a launched script once its results are written: wait for every rank, then leave with `os._exit(0)`.

    Twice in about ten runs of the whole suite (once under ZeRO-3, once under ZeRO-2, the second time with
    `destroy_process_group()` called first), rank 0 of a 2-process run that had printed and written all its results
    aborted on its way out: "terminate called without an active exception", a C++ thread still joinable when its
    owner was destroyed. `os._exit` skips the interpreter teardown where that happens; the barrier before it makes
    sure no rank is still inside a collective when the others leave."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
