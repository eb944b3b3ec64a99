"""Drawing K completions per prompt from prompt token ids, cut after EOS, with Hugging Face `generate`
([`HFSampler`]) or vLLM's offline engine ([`VLLMSampler`]).

The teacher-pool build and evaluation sample through these two classes (the trainer samples through GRPOTrainer's own
generation); prompts are tokenized by `pbsd_trl.tokens.tokenize_prompts` and the samples are scored by
`pbsd_trl.scoring.sequence_logps`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .kernels.shared_prefix import shared_prompt_prefill
from .logprobs import pad_token_lists, record_sampled_token_logps, use_decoding_logps
from .tokens import cut_after_eos


def bf16_autocast(device, bf16: bool):
    """bf16 autocast on `device` when `bf16`, else no autocast."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _per_prompt(values: list, num_prompts: int, num_samples: int) -> list[list]:
    return [values[i * num_samples : (i + 1) * num_samples] for i in range(num_prompts)]


class HFSampler:
    """K samples per prompt with `model.generate` on left-padded batches, each prompt's row repeated K times (what
    `num_return_sequences=K` would expand it to, in a form the shared prefill recognizes).

    Args:
        model: The causal LM to sample from.
        generate_kwargs: Keyword arguments of every `model.generate` call (a `generation_config`, or the settings
            themselves).
        pad_token_id: Id the prompts are left-padded with.
        eos_ids: Ids that end a completion; each completion is cut after its first one.
        device: Where the batches go.
        bf16: Sample in bf16 autocast.
        share_prompt_prefill: Prefill each prompt once for its K rows (`pbsd_trl.kernels.shared_prefix`), as the
            trainer's own `generate` calls do.
        record_logps_at: A temperature at which to read each sample's log-prob sum off the decoding steps (only
            right when `model` holds the sampling weights in float32, see `use_decoding_logps`); None: not read.
        pad_to_multiple_of: Pad each prompt batch to a multiple of this width (stable shapes are faster on CPU).
    """

    name = "hf"

    def __init__(
        self,
        model,
        generate_kwargs: dict,
        *,
        pad_token_id: int,
        eos_ids: Sequence[int],
        device,
        bf16: bool = False,
        share_prompt_prefill: bool = True,
        record_logps_at: float | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        self.model, self.generate_kwargs, self.device, self.bf16 = model, generate_kwargs, device, bf16
        self.pad_token_id, self.eos_ids, self.pad_to_multiple_of = pad_token_id, list(eos_ids), pad_to_multiple_of
        self.share_prompt_prefill, self.record_logps_at = share_prompt_prefill, record_logps_at

    @classmethod
    def for_training(cls, model, tokenizer, args, eos_ids: Sequence[int], device, bf16: bool = False) -> HFSampler:
        """The sampler of GRPOTrainer's generation settings in `args` (a `PBSDConfig`), reading the teacher's
        log-probs off the decoding steps where `teacher_logps_from_generation` allows it."""
        from transformers import GenerationConfig

        kwargs = {
            "max_new_tokens": args.max_completion_length,
            "do_sample": True,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": list(eos_ids),
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty,
            "cache_implementation": args.cache_implementation,
        }
        kwargs.update(args.generation_kwargs or {})
        records = use_decoding_logps(getattr(args, "teacher_logps_from_generation", None), model, bf16)
        return cls(
            model,
            {"generation_config": GenerationConfig(**kwargs, disable_compile=True)},
            pad_token_id=tokenizer.pad_token_id,
            eos_ids=eos_ids,
            device=device,
            bf16=bf16,
            share_prompt_prefill=getattr(args, "share_prompt_prefill", True),
            record_logps_at=args.temperature if records else None,
        )

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], num_samples: int):
        """`(completions, logps)`: per prompt, K completions (cut after EOS) and their log-prob sums read off the
        decoding steps (None where they must be scored)."""
        rows = [ids for ids in prompt_ids for _ in range(num_samples)]
        input_ids, attention_mask = pad_token_lists(
            rows, self.pad_token_id, "left", self.device, self.pad_to_multiple_of
        )
        prefill = shared_prompt_prefill(self.model) if self.share_prompt_prefill else contextlib.nullcontext()
        record = (
            contextlib.nullcontext()
            if self.record_logps_at is None
            else record_sampled_token_logps(self.model, self.record_logps_at)
        )
        with bf16_autocast(self.device, self.bf16), prefill, record as recorder:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **self.generate_kwargs)
        completions = [cut_after_eos(ids, self.eos_ids) for ids in out[:, input_ids.size(1) :].tolist()]
        per_token = None if recorder is None else recorder.per_row(completions)
        logps = (
            None if per_token is None else _per_prompt([sum(row) for row in per_token], len(prompt_ids), num_samples)
        )
        return _per_prompt(completions, len(prompt_ids), num_samples), logps


class VLLMSampler:
    """K samples per prompt with vLLM's offline engine (`vllm.LLM`).

    Args:
        llm: The engine.
        sampling_params: `sampling_params(n, seed)`: the `vllm.SamplingParams` of a call drawing `n` samples per prompt
            with `seed` (None: the engine's).
    """

    name = "vllm"

    def __init__(self, llm, sampling_params: Callable):
        self.llm, self.sampling_params = llm, sampling_params

    @classmethod
    def for_training(
        cls,
        model_name_or_path: str,
        args,
        eos_ids: Sequence[int],
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        dtype: str = "auto",
    ) -> VLLMSampler:
        """An engine loaded from `model_name_or_path`, sampling with GRPOTrainer's generation settings in `args`.

        vLLM only draws the samples; their teacher log-probs are scored by the HF model (the trainer's scoring
        function), so that the pool's log-probs and the trainer's agree. `dtype` should be the one the HF model scores
        in: vLLM's default ("auto") runs a float32 checkpoint in 16 bits, which would sample from a rounded teacher.
        """
        if args.generation_kwargs:
            raise ValueError(
                f"backend='vllm' does not translate `generation_kwargs` {args.generation_kwargs}; use 'hf'."
            )
        llm = load_vllm(
            model_name_or_path,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=args.vllm_max_model_length,
            dtype=dtype,
        )
        from vllm import SamplingParams

        return cls(
            llm,
            lambda n, seed: SamplingParams(
                n=n,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k or -1,
                min_p=args.min_p or 0.0,
                repetition_penalty=args.repetition_penalty,
                max_tokens=args.max_completion_length,
                stop_token_ids=list(eos_ids),
                ignore_eos=False,
                seed=seed,
            ),
        )

    def sample(self, prompt_ids: list[list[int]], num_samples: int, seed: int | None = None):
        """`(completions, None)`: per prompt, K completions; their log-probs are left to scoring."""
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, self.sampling_params(num_samples, seed), use_tqdm=False)
        return [[list(c.token_ids) for c in out.outputs] for out in outputs], None


def load_vllm(model_name_or_path: str, **kwargs):
    """`vllm.LLM(model=model_name_or_path, **kwargs)`, with an install hint when vLLM is missing."""
    try:
        from vllm import LLM
    except ImportError as err:
        raise ImportError('Sampling with vLLM needs it installed: `pip install -e ".[vllm]"`.') from err
    return LLM(model=model_name_or_path, **kwargs)
