#!/usr/bin/env bash
# The GPU checks, in one go (a lent GPU machine is held for minutes, not hours):
#   1. the fused kernel's CUDA tests (fp32 and bf16 against the float64 reference),
#   2. the kernel benchmark in bf16 against full-logits log_softmax and TRL's Triton fused head,
#   3. the main job (`examples/math.py`, built-in tiny model and task, shortened to 50 steps) trained on CUDA in bf16,
#   4. a tile-size sweep of the kernel on CUDA.
# Usage, from the repository root, with the package installed: bash benchmarks/run_cuda.sh OUT_DIR
# Each part has its own time limit so that a slow one cannot starve the others; the log is OUT_DIR/cuda_run.log.
set -uo pipefail
out=${1:-benchmarks/results}
parts=${PARTS:-1234}  # e.g. PARTS=124 skips the training run
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, triton, transformers, trl, datasets, peft, accelerate; print(sys.version.split()[0], *(f'{m.__name__} {m.__version__}' for m in (torch, triton, transformers, trl, datasets, peft, accelerate)), 'cuda', torch.version.cuda, sep=' | ')"
} 2>&1 | tee "$out/cuda_run.log"

[[ $parts == *1* ]] && {
echo "== 1. CUDA tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda -rA 2>&1 | tail -15 | tee -a "$out/cuda_run.log"

}
[[ $parts == *2* ]] && {
echo "== 2. kernel benchmark"
timeout 240 python3 benchmarks/bench_logprob_kernel.py --device cuda --dtype bf16 --tokens 1024 4096 8192 --hidden 2048 \
    --vocab 32768 151936 --reps 5 --out-dir "$out" 2>&1 | tail -40

}
[[ $parts == *3* ]] && {
echo "== 3. main job on CUDA, bf16"
timeout 170 python3 examples/math.py --bf16 true --max_steps 50 --eval_num_problems 100 --output_dir /tmp/pbsd-math-cuda --report_to none 2>&1 \
    | grep -v "it/s\]$\|s/it\]$" | tail -30 | tee -a "$out/cuda_run.log"
cp /tmp/pbsd-math-cuda/results.md "$out/math_cuda_results.md" 2>/dev/null
cp /tmp/pbsd-math-cuda/training_curves.png "$out/math_cuda_training_curves.png" 2>/dev/null

}
[[ $parts == *4* ]] && {
echo "== 4. tile sweep"
timeout 80 python3 benchmarks/bench_logprob_kernel.py --device cuda --dtype bf16 --sweep-only --sweep-shape 8192 2048 151936 \
    --sweep-tokens 1024 4096 8192 --sweep-vocab 4096 16384 32768 --reps 3 --out-dir "$out" 2>&1 | tail -15
}
