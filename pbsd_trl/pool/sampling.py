"""The teacher's prompts, its samples (Hugging Face `generate` or vLLM) and their teacher log-probs."""

from __future__ import annotations

import contextlib
import functools

import torch

from ..kernels.shared_prefix import shared_prompt_prefill
from ..logprobs import pad_token_lists, record_sampled_token_logps, use_decoding_logps
from ..tokens import cut_after_eos, tokenize_prompts  # noqa: F401  (part of `pbsd_trl.pool`'s API)


# ---- prompts ----------------------------------------------------------------------------------------------------
def teacher_prompt_builder(tokenizer, args, position_limit: tuple[int, str] | None = None):
    """The trainer's [`TeacherPromptBuilder`] for `args`, tokenizing as GRPOTrainer does; `position_limit` as the
    trainer's ([`teacher_position_limit`])."""
    from ..teacher.prompts import TeacherPromptBuilder

    kwargs = args.chat_template_kwargs or {}
    return TeacherPromptBuilder(
        template=args.teacher_prompt_template,
        column=args.privileged_context_column,
        allow_empty=args.allow_empty_privileged_context,
        max_length=args.max_teacher_prompt_length,
        count_tokens=lambda prompts: [len(ids) for ids in tokenize_prompts(tokenizer, prompts, kwargs)],
        encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
        position_limit=position_limit,
    )


# ---- sampling and scoring ---------------------------------------------------------------------------------------
def _autocast(device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def sequence_logps(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    temperature: float,
    pad_id: int,
    device,
    bf16: bool = False,
) -> list[float]:
    """Sum over each completion of `log softmax(logits / temperature)` at its tokens, given its prompt.

    The same computation as the trainer's teacher scoring with pbsd-trl's fused kernel (left-padded prompt,
    right-padded completion, hidden states through the LM head in fp32 without `[tokens, vocab]` logits): on a
    supported model each distinct prompt is run once and its KV cache serves its K completions
    (`pbsd_trl.kernels.shared_prefix`), else one `[prompt ; completion]` forward per row.
    """
    from ..kernels import fused_logprobs
    from ..kernels.shared_prefix import shared_prefix_token_logps, supports_shared_prefix
    from ..logprobs import concat_prompt_completion, head_logit_transform

    p_ids, p_mask = pad_token_lists(prompt_ids, pad_id, "left", device)
    c_ids, c_mask = pad_token_lists(completion_ids, pad_id, "right", device)
    if supports_shared_prefix(model):
        per_token = shared_prefix_token_logps(
            model,
            p_ids,
            p_mask,
            c_ids,
            c_mask,
            temperature=temperature,
            autocast=functools.partial(_autocast, device, bf16),
        )
        return per_token.sum(-1).tolist()
    input_ids, attention_mask, labels = concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)
    backbone = model.get_base_model().base_model if hasattr(model, "peft_config") else model.base_model
    head = model.get_output_embeddings()
    with _autocast(device, bf16):
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        softcap, logit_scale = head_logit_transform(model)
        logps = fused_logprobs(
            hidden[:, :-1].to(head.weight.device),
            head.weight,
            labels[:, 1:].to(head.weight.device),
            temperature=temperature,
            bias=head.bias,
            softcap=softcap,
            logit_scale=logit_scale,
        )
    return logps.sum(-1).tolist()


class HFSampler:
    """K samples per prompt with `model.generate`, GRPOTrainer's generation config, left-padded batches."""

    name = "hf"

    def __init__(self, model, tokenizer, args, eos_ids, device, bf16=False):
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.device, self.bf16 = model, tokenizer, device, bf16
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
        self.generation_config = GenerationConfig(**kwargs, disable_compile=True)
        self.share_prompt_prefill = getattr(args, "share_prompt_prefill", True)
        self.eos_ids, self.temperature = list(eos_ids), args.temperature
        # the teacher samples with its own weights: its log-probs of the samples can be read off the decoding steps
        self.records_logps = use_decoding_logps(getattr(args, "teacher_logps_from_generation", None), model, bf16)

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], num_samples: int):
        """`(completions, logps)`: K completions per prompt (cut after EOS), and their teacher log-prob sums from
        the decoding steps (`records_logps`), or None where they must be scored."""
        rows = [ids for ids in prompt_ids for _ in range(num_samples)]
        input_ids, attention_mask = pad_token_lists(rows, self.tokenizer.pad_token_id, "left", self.device)
        # each prompt's K rows share one prefill and (on CPU) one read of its cache per step, as in the trainer's calls
        prefill = shared_prompt_prefill(self.model) if self.share_prompt_prefill else contextlib.nullcontext()
        record = (
            record_sampled_token_logps(self.model, self.temperature)
            if self.records_logps
            else contextlib.nullcontext()
        )
        with _autocast(self.device, self.bf16), prefill, record as recorder:
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
            )
        completions = [cut_after_eos(ids, self.eos_ids) for ids in out[:, input_ids.size(1) :].tolist()]
        per_token = None if recorder is None else recorder.per_row(completions)
        logps = None if per_token is None else [sum(row) for row in per_token]
        group = lambda values: [values[i * num_samples : (i + 1) * num_samples] for i in range(len(prompt_ids))]  # noqa: E731
        return group(completions), None if logps is None else group(logps)


class VLLMSampler:
    """K samples per prompt with vLLM's offline engine (`vllm.LLM`) loaded from the teacher's path.

    vLLM only draws the samples; their teacher log-probs are still computed by the HF model (the trainer's scoring
    function), so that the pool's log-probs and the trainer's agree. `dtype` should be the one the HF model scores in:
    vLLM's default ("auto") runs a float32 checkpoint in 16 bits, which would sample from a rounded teacher.
    """

    name = "vllm"

    def __init__(
        self,
        model_name_or_path: str,
        args,
        eos_ids,
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        dtype: str = "auto",
    ):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError("backend='vllm' needs vLLM: `pip install vllm` (or use backend='hf').") from err
        if args.generation_kwargs:
            raise ValueError(
                f"backend='vllm' does not translate `generation_kwargs` {args.generation_kwargs}; use 'hf'."
            )
        self.llm = LLM(
            model=model_name_or_path,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=args.vllm_max_model_length,
            dtype=dtype,
        )
        self._params = lambda n: SamplingParams(
            n=n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k or -1,
            min_p=args.min_p or 0.0,
            repetition_penalty=args.repetition_penalty,
            max_tokens=args.max_completion_length,
            stop_token_ids=list(eos_ids),
            ignore_eos=False,
        )

    def sample(self, prompt_ids: list[list[int]], num_samples: int):
        """`(completions, None)`: K completions per prompt; their teacher log-probs are scored by the HF model."""
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, self._params(num_samples), use_tqdm=False)
        return [[list(c.token_ids) for c in out.outputs] for out in outputs], None
