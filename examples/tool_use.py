"""PBSD on ReAct tool use: evaluate, train, evaluate, report.

With no arguments it runs on a laptop CPU in minutes, offline: the built-in tiny base model
(`pbsd_trl.tiny.get_base_model("tool_use")`, shipped in the package and checksummed) on the built-in synthetic
tool-use task (`pbsd_trl.data.tool_task`, SDFT's ToolAlpaca format: the student sees tool names and a question, the
privileged context holds the tool's documentation and a demonstration). The reward is `tool_call_reward` (same
actions and same merged arguments as the `golden_answer`). It reports tool-call accuracy (Avg@8) of the student and
of the teacher (the network with the documentation) on 200 held-out examples before and after training, and writes
`results.json`, `results.md` and `training_curves.png` into the output directory (default `pbsd-tool-use-tiny/`).

    python examples/tool_use.py

Other data: `--dataset_name FILE_OR_HUB_ID --prompt_column ... --solution_column ... --answer_column <gold calls>`
(the gold column holds SDFT's `[{"Action": ..., "Action_Input": ...}]` list). Every `PBSDConfig` field, `--config`
YAML files, `--use_peft`, `--use_vllm`, interrupt-safe checkpoints and `--resume_from_checkpoint` work as in
`examples/math.py`, and so does `accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml
--num_processes 2 examples/tool_use.py` (also `zero2.yaml`, and `zero3.yaml` with `--eval_num_problems 0`, after
`pip install -e ".[deepspeed]"`; see `examples/math.py`).
"""

import os
import sys


# `examples/math.py` sits next to this file and is named like the standard library's `math`: take this folder off the
# import path before anything (numpy, random, ...) imports `math`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import time
from pathlib import Path

from accelerate import PartialState
from trl import get_peft_config

from pbsd_trl import PBSDTrainer
from pbsd_trl.callbacks import SignalCheckpointCallback
from pbsd_trl.data.loading import load_train_and_eval_datasets
from pbsd_trl.data.tasks import TASKS
from pbsd_trl.evaluate import evaluate_student_and_teacher
from pbsd_trl.models import load_model_and_tokenizer
from pbsd_trl.pool import use_default_pool
from pbsd_trl.report import output_listing, plot_training_curves, results_table, summary_line, write_results
from pbsd_trl.scripts.utils import parse_args, resume_arg, set_num_threads
from pbsd_trl.tiny import get_base_model


TASK = TASKS["tool_use"]
TITLE = "PBSD on the built-in ReAct tool-use task"
# The no-argument run on the built-in tiny model (the rest of the defaults: `pbsd_trl.scripts.utils.EXAMPLE_DEFAULTS`)
DEFAULTS = {"output_dir": "pbsd-tool-use-tiny", "max_completion_length": 64, "learning_rate": 1e-4, "max_steps": 60}


def main(argv=None):
    start = time.perf_counter()
    script_args, training_args, model_args = parse_args(TASK, DEFAULTS, argv)
    state = PartialState()
    say = print if state.is_main_process else lambda *args: None

    # Data first: a bad file or a missing column fails before any model is built
    context_column = training_args.privileged_context_column
    train_dataset, eval_dataset = load_train_and_eval_datasets(
        TASK, **script_args.dataset_kwargs(context_column, training_args.seed)
    )

    # Model: the built-in tiny base model (shipped in the package) unless --model_name_or_path
    model_path = model_args.model_name_or_path
    set_num_threads(script_args.num_threads, model_path is None, training_args.use_cpu, state.num_processes)
    if model_path is None:
        with state.main_process_first():
            model_path = get_base_model(
                TASK.name, build=script_args.build_base_model, progress_bar=state.is_main_process
            )
    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model, tokenizer = load_model_and_tokenizer(
        model_path, dtype=model_args.dtype, revision=model_args.model_revision, **attention
    )

    # Rewards: SDFT's tool-call accuracy (same actions, same merged arguments as the golden answer)
    reward_funcs = list(TASK.reward_funcs)

    k = script_args.eval_k

    def evaluate(net, label):
        """Student and teacher-with-context Avg@k, on the main process."""
        if eval_dataset is None or not state.is_main_process:
            return None
        reports = evaluate_student_and_teacher(
            net,
            tokenizer,
            eval_dataset,
            reward_funcs,
            k,
            teacher=script_args.eval_teacher,
            description=label,
            batch_size=script_args.eval_batch_size,
            max_new_tokens=training_args.max_completion_length,
            temperature=training_args.temperature,
            teacher_prompt_template=training_args.teacher_prompt_template,
            privileged_context_column=context_column,
            seed=training_args.seed,
        )
        say(f"[pbsd] {label}: {summary_line(reports, k)}", flush=True)
        return reports

    resume = resume_arg(training_args.resume_from_checkpoint)
    before = evaluate(model, "before training") if resume is None else None
    state.wait_for_everyone()

    # Train
    stopper = SignalCheckpointCallback()  # SIGTERM / Ctrl-C: checkpoint at the end of the step, then stop
    trainer = PBSDTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[stopper],
    )
    if script_args.auto_teacher_pool:  # the fixed base teacher's samples, drawn in large batches before training
        use_default_pool(trainer, train_dataset, say=say)
    train_start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:  # when train() raises, on_train_end never runs: give the caller its signal handlers back here
        stopper.uninstall()
    train_seconds = time.perf_counter() - train_start
    out_dir = Path(training_args.output_dir)

    # Evaluate the trained model (unless interrupted: then say how to resume)
    after = None
    if stopper.stop_requested:
        checkpoint = out_dir / f"checkpoint-{trainer.state.global_step}"
        say(f"[pbsd] Interrupted: continue with the same command plus --resume_from_checkpoint {checkpoint}")
    else:
        trainer.save_model(str(out_dir))  # every process: collective under DeepSpeed ZeRO-3
        if state.is_main_process:
            tokenizer.save_pretrained(str(out_dir))
        state.wait_for_everyone()
        after = evaluate(trainer.accelerator.unwrap_model(trainer.model), "after training")
    state.wait_for_everyone()

    # Report: results.json, results.md, training_curves.png
    results = {
        "task": TASK.name,
        "model": model_path,
        "dataset": script_args.dataset_name or f"builtin:{TASK.name}",
        "k": k,
        "global_step": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "interrupted": stopper.stop_requested,
        "before": before,
        "after": after,
    }
    if state.is_main_process:
        plot = None
        if script_args.plot:
            plot = plot_training_curves(trainer.state.log_history, out_dir / "training_curves.png", title=TITLE)
        results["training_curves"] = str(plot) if plot else None
        results["total_seconds"] = round(time.perf_counter() - start, 1)
        table = results_table(before, after, k) if (before or after) else "(no evaluation)"
        write_results(out_dir, results, table, TITLE)
        say(f"\n{table}\n\n{output_listing(out_dir)}\n[pbsd] Total time {results['total_seconds']:.0f} s")
    state.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
    # a clean exit: gloo/NCCL threads that outlive the interpreter can abort a finished run
    PartialState().destroy_process_group()
