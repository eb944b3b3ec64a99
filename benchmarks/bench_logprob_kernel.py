"""
Forward+backward time and extra peak memory of the PBSD log-prob computation, for three contenders doing the same work:
student log-probs with backward, teacher log-probs forward-only, loss `(student_logps * w).sum() + gap.sum()`.

- `naive`: full `[B, T, V]` logits, `log_softmax` + `gather` (`pbsd_trl.kernels.reference_logprob_gap`);
- `trl`: TRL's `ChunkedLogProbFunction`, called as `add_fused_lm_head` does (compact rows on Triton devices, every
  position scored then masked elsewhere; on CPU its torch fallback runs);
- `ours`: `pbsd_trl.kernels.fused_logprob_gap`, student and teacher rows in one call;
- `1path`: what `PBSDTrainer` runs (`use_fused_logprob_kernel=True`): `pbsd_trl.kernels.logprob_kernel`, the single-path
  form of the same autograd function, once for the student (with backward) and once for the teacher (no grad).

Contenders are interleaved within each repetition (rotating the order) and medians are reported, because the host may
be shared. Extra peak memory is the peak over the live inputs, minus the gradients the run must return:
- CPU: the process's resident high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`) minus the resident
  size just before the run, after `malloc_trim` so that freed heap pages are not silently reused;
- CUDA: `torch.cuda.max_memory_allocated` minus the allocated bytes just before the run.

Usage:
    python benchmarks/bench_logprob_kernel.py                 # CPU grid, writes benchmarks/results/logprob_kernel.*
    python benchmarks/bench_logprob_kernel.py --quick --out-dir /tmp/x
    python benchmarks/bench_logprob_kernel.py --device cuda --dtype bf16
    python benchmarks/bench_logprob_kernel.py --sweep         # tile-size sweep of `ours`
    python benchmarks/bench_logprob_kernel.py --contenders ours 1path --name logprob_kernel_paths  # 2 paths vs 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from harness.system import PeakMemory, machine_description, pyplot, report_header, result_stem

from pbsd_trl.kernels import fused_logprob_gap, fused_logprobs, reference_logprob_gap


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEQ_LEN = 512
# (label, contender compared with, result field, bound on ours/contender): CPU against naive and TRL's torch fallback; CUDA against TRL's Triton
TARGETS = {
    "cpu": [
        ("time ours/naive <= 1.1", "naive", "median_s", 1.1),
        ("extra mem ours/naive <= 1/5", "naive", "median_extra_bytes", 1 / 5),
        ("time ours/trl <= 0.55", "trl", "median_s", 0.55),
        ("extra mem ours/trl <= 1/3", "trl", "median_extra_bytes", 1 / 3),
    ],
    "cuda": [
        ("time ours/trl (Triton) <= 1.2", "trl", "median_s", 1.2),
        ("extra mem ours/trl (Triton) <= 1", "trl", "median_extra_bytes", 1.0),
    ],
}


# ---------------------------------------------------------------------------------------------------------- contenders
def _trl_logprob_gap(student_hidden, teacher_hidden, weight, labels, temperature=1.0, ignore_index=-100, bias=None):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    mask = labels != ignore_index
    compact = _use_triton(student_hidden.device)

    def score(hidden):
        per_token = ChunkedLogProbFunction.apply(
            hidden[mask] if compact else hidden.reshape(-1, hidden.size(-1)),
            weight,
            bias,
            labels[mask] if compact else labels.clamp(min=0).reshape(-1),
            temperature,
            _CHUNKED_LOGPROB_CHUNK_SIZE,
            None,
            1.0,
            ("log_probs",),
        )[0]
        if compact:
            return per_token.new_zeros(mask.shape).masked_scatter(mask, per_token)
        return per_token.view(mask.shape).masked_fill(~mask, 0)

    student_logps = score(student_hidden)
    with torch.no_grad():
        teacher_logps = score(teacher_hidden)
    return student_logps, teacher_logps, (student_logps - teacher_logps).sum(-1)


def _naive_logprob_gap(student_hidden, teacher_hidden, weight, labels):
    return reference_logprob_gap(student_hidden, teacher_hidden, weight, labels)


def _ours(token_chunk_size=None, vocab_chunk_size=None):
    def fn(student_hidden, teacher_hidden, weight, labels):
        return fused_logprob_gap(
            student_hidden,
            teacher_hidden,
            weight,
            labels,
            token_chunk_size=token_chunk_size,
            vocab_chunk_size=vocab_chunk_size,
        )

    return fn


def _single_path_calls(student_hidden, teacher_hidden, weight, labels):
    with torch.no_grad():
        teacher_logps = fused_logprobs(teacher_hidden, weight, labels)
    student_logps = fused_logprobs(student_hidden, weight, labels)
    return student_logps, teacher_logps, (student_logps - teacher_logps).sum(-1)


# ------------------------------------------------------------------------------------------------------------- harness
def make_inputs(n_tokens, hidden, vocab, dtype, device, ignore_frac, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq_len = min(SEQ_LEN, n_tokens)
    batch = n_tokens // seq_len
    student = torch.randn(batch, seq_len, hidden, generator=gen)
    teacher = (student + 0.5 * torch.randn(batch, seq_len, hidden, generator=gen)).to(device, dtype)
    student = student.to(device, dtype).requires_grad_()
    # Scaled like a trained head: logits of a few units, not hundreds
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    # Right padding of each completion, `ignore_frac` of the positions on average
    pad = torch.randint(0, int(2 * ignore_frac * seq_len) + 1, (batch,), generator=gen)
    labels[torch.arange(seq_len) >= (seq_len - pad).unsqueeze(1)] = -100
    token_weights = torch.randn(batch, seq_len, generator=gen).to(device)
    return student, teacher, weight, labels.to(device), token_weights


def run_once(fn, inputs, device):
    student, teacher, weight, labels, token_weights = inputs
    student.grad = weight.grad = None
    with PeakMemory(device) as mem:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        student_logps, _, gap = fn(student, teacher, weight, labels)
        ((student_logps * token_weights).sum() + gap.sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        del student_logps, gap
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (student, weight))
    return elapsed, max(mem.peak - grad_bytes, 0)


def contenders(device):
    out = {"naive": _naive_logprob_gap, "trl": _trl_logprob_gap, "ours": _ours(), "1path": _single_path_calls}
    try:
        import trl.trainer.utils  # noqa: F401  (its import would otherwise land inside TRL's first backward)
    except ImportError:
        out.pop("trl")
    return out


def bench_shape(fns, shape, args):
    n_tokens, hidden, vocab = shape
    inputs = make_inputs(n_tokens, hidden, vocab, DTYPES[args.dtype], args.device, args.ignore_frac)
    names = list(fns)
    # One untimed call each: lazy imports, allocator and BLAS warm-up
    if args.warmup:
        for name in names:
            run_once(fns[name], inputs, args.device)
    times = {name: [] for name in names}
    mems = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            t, m = run_once(fns[name], inputs, args.device)
            times[name].append(t)
            mems[name].append(m)
            shape_str = f"N={n_tokens} H={hidden} V={vocab}"
            print(f"  {shape_str} rep={rep} {name:6s} {t:8.3f} s  +{m / 2**20:8.1f} MiB", flush=True)
    valid = int((inputs[3] != -100).sum())
    return {
        "n_tokens": n_tokens,
        "hidden": hidden,
        "vocab": vocab,
        "scored_tokens": valid,
        "times_s": times,
        "extra_peak_bytes": mems,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "median_extra_bytes": {k: statistics.median(v) for k, v in mems.items()},
    }


def sweep(args):
    n_tokens, hidden, vocab = args.sweep_shape
    inputs = make_inputs(n_tokens, hidden, vocab, DTYPES[args.dtype], args.device, args.ignore_frac)
    token_chunks, vocab_chunks = args.sweep_tokens, args.sweep_vocab
    configs = [(t, v) for t in token_chunks for v in vocab_chunks]
    times = {f"{t}x{v}": [] for t, v in configs}
    for t, v in configs:
        run_once(_ours(t, v), inputs, args.device)
    for rep in range(args.reps):
        for t, v in configs[rep % len(configs) :] + configs[: rep % len(configs)]:
            elapsed, _ = run_once(_ours(t, v), inputs, args.device)
            times[f"{t}x{v}"].append(elapsed)
            print(f"  sweep {t}x{v} rep={rep} {elapsed:.3f} s", flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": [n_tokens, hidden, vocab], "times_s": times, "median_s": medians}


# ------------------------------------------------------------------------------------------------------------- reports
def _verdict(value, target):
    return "PASS" if value <= target else "MISS"


def write_markdown(path, results, sweep_result, machine, args, command):
    # GPU runs take milliseconds: print them as such
    unit, scale, digits = ("ms", 1e3, 1) if args.device == "cuda" else ("s", 1.0, 2)
    lines = [
        *report_header("Fused student/teacher log-prob kernel: benchmark", command, machine),
        "## Setup",
        "",
        f"- dtype {args.dtype}, device {args.device}, {args.reps} interleaved repetitions (order rotated), medians"
        f" reported; sequences of {SEQ_LEN} tokens with ~{args.ignore_frac:.0%} right padding (`-100`), so `N` counts"
        " positions and the scored ones are fewer.",
        f"- torch intra-op threads: {torch.get_num_threads()} (`--threads`; on a shared, oversubscribed host the OpenMP"
        " barriers of a 2-thread pool made small ops 10-50x slower and the timings meaningless).",
        "- Same work for every contender: student log-probs with backward, teacher log-probs forward-only, loss"
        " `(student_logps * w).sum() + gap.sum()`, backward into the student hidden states and the head weight.",
        "- `naive`: full-logits `log_softmax` + `gather`; `trl`: TRL's `ChunkedLogProbFunction` called as"
        " `add_fused_lm_head` calls it (on CPU: torch fallback, every position scored then masked); `ours`:"
        " `pbsd_trl.kernels.fused_logprob_gap` with its default tiles; `1path`: what `PBSDTrainer` runs,"
        " `pbsd_trl.kernels.logprob_kernel` once for the student (with backward) and once for the teacher (no grad).",
        "- Extra peak memory: peak during forward+backward over what is live before it (inputs), minus the returned"
        " gradients. CPU: resident high-water mark (`VmHWM` after resetting it through `/proc/self/clear_refs`) minus"
        " the resident size right before the run, after `gc.collect()` and `malloc_trim(0)`; this counts every page"
        " the run touches, tensors and temporaries alike. CUDA: `torch.cuda.max_memory_allocated()` minus"
        " `memory_allocated()` before the run.",
        "",
        "## Results",
        "",
        f"| N | H | V | naive {unit} | trl {unit} | ours {unit} | 1path {unit} | ours/naive | ours/trl | ours/1path"
        " | naive MiB | trl MiB | ours MiB | 1path MiB | mem ours/naive | mem ours/trl | mem ours/1path |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = ("naive", "trl", "ours", "1path")
    for r in results:
        t, m = r["median_s"], r["median_extra_bytes"]
        row = [str(r["n_tokens"]), str(r["hidden"]), str(r["vocab"])]
        row += [f"{t[k] * scale:.{digits}f}" if k in t else "-" for k in names]
        row += [f"{t['ours'] / t[k]:.2f}" if k in t else "-" for k in ("naive", "trl", "1path")]
        row += [f"{m[k] / 2**20:.0f}" if k in m else "-" for k in names]
        row += [f"{m['ours'] / m[k]:.3f}" if k in m else "-" for k in ("naive", "trl", "1path")]
        lines.append("| " + " | ".join(row) + " |")

    big = [r for r in results if r["vocab"] == max(x["vocab"] for x in results)]
    lines += ["", f"## Targets (V={big[0]['vocab']})", ""]
    lines += ["| N | H | target | value | verdict |", "|---|---|---|---|---|"]
    for r in big:
        for name, other, metric, bound in TARGETS[args.device]:
            if other in r[metric]:
                value = r[metric]["ours"] / r[metric][other]
                lines.append(f"| {r['n_tokens']} | {r['hidden']} | {name} | {value:.3f} | {_verdict(value, bound)} |")

    if sweep_result is not None:
        n, h, v = sweep_result["shape"]
        lines += ["", f"## Tile sweep (`ours`, N={n}, H={h}, V={v}, median s)", ""]
        lines += [f"Command: `{sweep_result.get('command', '')}`", "", "| tokens x vocab | s |", "|---|---|"]
        for key, value in sorted(sweep_result["median_s"].items(), key=lambda kv: kv[1]):
            lines.append(f"| {key} | {value:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path, results):
    plt = pyplot()
    if plt is None:
        return
    labels = [f"N={r['n_tokens']}\nH={r['hidden']}\nV={r['vocab']}" for r in results]
    names = [k for k in ("naive", "trl", "ours", "1path") if k in results[0]["median_s"]]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(results) * 2), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(results))]
        axes[0].bar(xs, [r["median_s"][name] for r in results], width, label=name)
        axes[1].bar(xs, [r["median_extra_bytes"][name] / 2**20 for r in results], width, label=name)
    for ax, title in zip(axes, ("forward+backward time (s, median)", "extra peak memory (MiB, median)"), strict=True):
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--hidden", type=int, nargs="+", default=[512])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--ignore-frac", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true", help="tiny grid, runs in seconds")
    parser.add_argument("--sweep", action="store_true", help="sweep the tile sizes of `ours` into <name>_sweep.json")
    parser.add_argument("--sweep-only", action="store_true", help="run the sweep and stop")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads; default 1 on CPU: on a shared host, OpenMP barriers of oversubscribed threads"
        " make small ops 10-50x slower and the timings meaningless",
    )
    parser.add_argument(
        "--contenders", nargs="+", default=["naive", "trl", "ours", "1path"], choices=["naive", "trl", "ours", "1path"]
    )
    parser.add_argument("--sweep-shape", type=int, nargs=3, default=[1024, 512, 32768])
    parser.add_argument("--sweep-tokens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--sweep-vocab", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--name",
        default=None,
        help="stem of the result files (default logprob_kernel, on CUDA logprob_kernel_cuda_<gpu name>)",
    )
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.name = args.name or result_stem("logprob_kernel", args.device)
    args.sweep = args.sweep or args.sweep_only
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.reps = [256], [64], [1024, 4096], 3
        args.sweep_shape, args.sweep_tokens, args.sweep_vocab = [256, 64, 4096], [64, 256], [512, 2048]
    return args


def main(argv=None):
    args = parse_args(argv)
    command = "python benchmarks/bench_logprob_kernel.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description(args.device)
    stem = args.out_dir / args.name
    sweep_path = args.out_dir / f"{args.name}_sweep.json"
    if args.sweep:
        sweep_result = sweep(args)
        sweep_result.update(command=command, machine=machine)
        sweep_path.write_text(json.dumps(sweep_result, indent=1))
        if args.sweep_only:
            print(json.dumps(sweep_result["median_s"], indent=1))
            return
    else:
        # A sweep run earlier (`--sweep-only`) goes into the report next to the grid
        sweep_result = json.loads(sweep_path.read_text()) if sweep_path.exists() else None
    fns = {name: fn for name, fn in contenders(args.device).items() if name in args.contenders}
    if args.device == "cpu" and "trl" in fns:
        print("TRL contender: torch fallback of ChunkedLogProbFunction (no Triton on CPU)")
    results = []
    for n_tokens in args.tokens:
        for hidden in args.hidden:
            for vocab in args.vocab:
                results.append(bench_shape(fns, (n_tokens, hidden, vocab), args))
    payload = {"command": command, "machine": machine, "args": {k: str(v) for k, v in vars(args).items()}}
    payload.update(results=results, sweep=sweep_result)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    write_markdown(stem.with_suffix(".md"), results, sweep_result, machine, args, command)
    write_plot(stem.with_suffix(".png"), results)
    print((stem.with_suffix(".md")).read_text())
    print(f"Reproduce with: {command}")


if __name__ == "__main__":
    main()
