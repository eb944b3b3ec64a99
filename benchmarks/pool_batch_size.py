"""Teacher-pool build throughput against the number of completions per `generate` call.

Builds the default math job's teacher pool (the shipped base model, its settings: K=8 samples per row, 56 completion
tokens, temperature 1) for the first `--rows` training rows with each batch size, the sizes interleaved round by
round so that a noisy machine slows them alike, and reports generated tokens per second (sampling and teacher
scoring included) and the ratio to 256 completions per call. It is the measurement behind
`pbsd_trl.pool.default_pool_batch_size`.

    python benchmarks/pool_batch_size.py                      # CPU, writes benchmarks/results/pool_batch_size.md
    python benchmarks/pool_batch_size.py --device cuda        # on a GPU
"""

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.system import machine_description, quiet_training_logs, report_header, result_stem  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 128, 256, 1024])
    p.add_argument("--rows", type=int, default=128, help="training rows (x K=8 samples each)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num_threads", type=int, default=os.cpu_count())
    p.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="Smoke run: 4 rows, one round, two sizes.")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.rows, args.rounds, args.batch_sizes = 4, 1, [8, 32]
    quiet_training_logs(args.num_threads)
    import torch
    from transformers import AutoModelForCausalLM

    from pbsd_trl import PBSDConfig
    from pbsd_trl.pool import build_teacher_pool
    from pbsd_trl.recipes.data.math_task import MATH_TEACHER_TEMPLATE, make_math_dataset
    from pbsd_trl.recipes.tiny import get_base_model, load_tokenizer

    command = "python benchmarks/pool_batch_size.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    path = get_base_model("math")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device)
    tokenizer = load_tokenizer(path)
    dataset = make_math_dataset("train", n=args.rows, seed=0)
    K = 8
    scratch = tempfile.mkdtemp(prefix="pool-batch-")
    config = PBSDConfig(
        output_dir=scratch,
        per_device_train_batch_size=64,
        num_generations=8,
        max_completion_length=56,
        temperature=1.0,
        teacher_prompt_template=MATH_TEACHER_TEMPLATE,
        use_cpu=args.device == "cpu",
        bf16=args.device != "cpu",
        report_to="none",
    )
    seconds = {size: [] for size in args.batch_sizes}
    tokens = {}
    for round_index in range(args.rounds):
        for size in args.batch_sizes:
            start = time.perf_counter()
            pool = build_teacher_pool(
                model,
                tokenizer,
                dataset,
                os.path.join(scratch, f"r{round_index}-b{size}"),
                config,
                K,
                batch_size=size,
                progress=False,
            )
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds[size].append(time.perf_counter() - start)
            tokens[size] = sum(len(c) for row in pool["completion_ids"] for c in row)
            print(f"round {round_index + 1}, {size} per call: {seconds[size][-1]:.1f} s", flush=True)

    reference = 256 if 256 in seconds else args.batch_sizes[0]
    speed = {size: tokens[size] / statistics.median(seconds[size]) for size in args.batch_sizes}
    lines = report_header(
        "Teacher-pool build throughput vs completions per generate call", command, machine_description(args.device)
    )
    lines += [
        f"The shipped math base model, {args.rows} training rows x K={K} samples, 56 completion tokens, temperature 1, "
        f"{args.device}{' bf16' if args.device != 'cpu' else ' fp32'}; median of {args.rounds} interleaved rounds. "
        "Tokens per second count the generated completion tokens; the time includes the teacher log-probs (read "
        "off the decoding steps in float32, else a scoring pass).",
        "",
        f"| completions per call | seconds (each round) | tokens/s | vs {reference} |",
        "|---|---|---|---|",
    ]
    for size in args.batch_sizes:
        rounds = ", ".join(f"{s:.1f}" for s in seconds[size])
        lines.append(f"| {size} | {rounds} | {speed[size]:.0f} | {speed[size] / speed[reference]:.2f}x |")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{result_stem('pool_batch_size', args.device)}{'_quick' if args.quick else ''}.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(args.batch_sizes) - 2 :]))
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
