"""
Avg@k / pass@k evaluation of a saved model from the command line (the report of [`~pbsd_trl.recipes.evaluate.evaluate_avg_at_k`]).

```bash
python -m pbsd_trl.scripts.evaluate --model_name_or_path DIR --dataset_name builtin:math --k 8 --reward math \\
    --output report.json [--with_privileged_context] [--greedy] [--use_vllm]
```

`--dataset_name` is `builtin:math` / `builtin:tool_use` (the 200 held-out problems of the built-in tasks), a local
`.json`/`.jsonl`/`.parquet`/`.csv` file, or a Hub dataset id (with `--dataset_split`); the column flags map other
schemas as [`~pbsd_trl.recipes.data.loading.load_prompt_dataset`] does.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoTokenizer

from ..recipes.data.loading import load_prompt_dataset
from ..recipes.data.tasks import TASKS
from ..recipes.evaluate import evaluate_avg_at_k
from ..recipes.models import load_model_and_tokenizer


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pbsd_trl.scripts.evaluate",
        description="Avg@k / pass@k evaluation of a causal LM with a GRPO-style reward function.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="Local directory or hub id of a causal LM.")
    parser.add_argument(
        "--dataset_name",
        default=None,
        help="builtin:math, builtin:tool_use (held-out split), a local json/jsonl/parquet/csv file, or a hub id. "
        "Default: builtin:<reward>.",
    )
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--dataset_split", default="test", help="Split of a hub dataset (default: test).")
    parser.add_argument("--prompt_column", default="prompt")
    parser.add_argument("--solution_column", default="privileged_context", help="Column with the privileged context.")
    parser.add_argument("--answer_column", default=None, help="Column with the reference answer (math reward).")
    parser.add_argument("--reward", choices=["math", "tool_use"], default="math")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--num_problems", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=32, help="Problems per generate call.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="Also report greedy accuracy.")
    parser.add_argument("--with_privileged_context", action="store_true", help="Evaluate the teacher prompt.")
    parser.add_argument(
        "--teacher_prompt_template", default=None, help="Default: the built-in task's template, else PBSDConfig's."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use_vllm", action="store_true", help="Sample with vllm.LLM (needs vLLM; untested on CPU).")
    parser.add_argument("--output", default=None, help="Write the JSON report here.")
    parser.add_argument("--no_progress_bar", action="store_true")
    parser.add_argument(
        "--num_threads", type=int, default=None, help="torch.set_num_threads (1 is best on a busy CPU)."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _build_parser().parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    task = TASKS[args.reward]
    dataset_name = args.dataset_name or f"builtin:{args.reward}"
    dataset = load_prompt_dataset(
        dataset_name,
        split=args.dataset_split,
        builtin_split="eval",
        config=args.dataset_config,
        prompt_column=args.prompt_column,
        solution_column=args.solution_column,
        answer_column=args.answer_column,
        task=task,
        num_rows=args.num_problems,
    )
    template = args.teacher_prompt_template
    if template is None:
        template = task.teacher_prompt_template if dataset_name.startswith("builtin:") else None
    if args.use_vllm:
        model, tokenizer = args.model_name_or_path, AutoTokenizer.from_pretrained(args.model_name_or_path)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model_name_or_path)
    report = evaluate_avg_at_k(
        model,
        tokenizer,
        dataset,
        list(task.reward_funcs),
        args.k,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.greedy,
        with_privileged_context=args.with_privileged_context,
        teacher_prompt_template=template,
        seed=args.seed,
        use_vllm=args.use_vllm,
        progress_bar=not args.no_progress_bar,
    )
    report.update(model=args.model_name_or_path, dataset=dataset_name, reward=args.reward)
    summary = {
        key: report[key]
        for key in ("prompt", "k", "n_problems", "avg_at_k", "pass_at_k", "greedy_accuracy", "seconds")
    }
    print(json.dumps(summary, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"Report written to {args.output}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
