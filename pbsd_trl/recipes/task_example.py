"""The steps the example scripts share (`examples/math.py`, `examples/tool_use.py`): load the data and the model,
evaluate the student and the teacher, train with PBSD, evaluate again, and report."""

from __future__ import annotations

import time
from pathlib import Path

from accelerate import PartialState
from trl import get_peft_config

from ..pool import use_default_pool
from ..trainer import PBSDTrainer
from .data.loading import load_train_and_eval_datasets
from .data.tasks import TaskSpec
from .evaluate import evaluate_student_and_teacher
from .example_args import resume_arg, set_num_threads
from .models import load_model_and_tokenizer
from .report import output_listing, plot_training_curves, results_table, summary_line, write_results
from .tiny import get_base_model


def run_task_example(task: TaskSpec, title: str, script_args, training_args, model_args, stopper) -> dict:
    """Evaluate, train, evaluate, report; `stopper` is the callback that turns Ctrl-C / SIGTERM into a checkpoint.
    Returns the results written to `results.json`."""
    start = time.perf_counter()
    state = PartialState()
    say = print if state.is_main_process else lambda *args, **kwargs: None

    # Data first: a bad file or a missing column fails before any model is built
    train_dataset, eval_dataset = load_train_and_eval_datasets(
        task, **script_args.dataset_kwargs(training_args.privileged_context_column, training_args.seed)
    )
    model, tokenizer, model_path = load_task_model(task, script_args, training_args, model_args, state)
    reward_funcs = list(task.reward_funcs)

    def evaluate(net, label):
        """Student and teacher-with-context Avg@k, on the main process."""
        if eval_dataset is None or not state.is_main_process:
            return None
        reports = evaluate_student_and_teacher(
            net,
            tokenizer,
            eval_dataset,
            reward_funcs,
            script_args.eval_k,
            teacher=script_args.eval_teacher,
            description=label,
            batch_size=script_args.eval_batch_size,
            max_new_tokens=training_args.max_completion_length,
            temperature=training_args.temperature,
            teacher_prompt_template=training_args.teacher_prompt_template,
            privileged_context_column=training_args.privileged_context_column,
            seed=training_args.seed,
        )
        say(f"[pbsd] {label}: {summary_line(reports, script_args.eval_k)}", flush=True)
        return reports

    resume = resume_arg(training_args.resume_from_checkpoint)
    before = evaluate(model, "before training") if resume is None else None
    state.wait_for_everyone()
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
    train_seconds = train_until_done_or_stopped(trainer, resume, stopper)
    after = finish_training(trainer, tokenizer, stopper, state, say, evaluate)
    results = {
        "task": task.name,
        "model": model_path,
        "dataset": script_args.dataset_name or f"builtin:{task.name}",
        "k": script_args.eval_k,
        "global_step": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "interrupted": stopper.stop_requested,
        "before": before,
        "after": after,
    }
    write_report(results, trainer, script_args, title, state, say, start)
    return results


def load_task_model(task: TaskSpec, script_args, training_args, model_args, state):
    """`(model, tokenizer, path)`: the built-in tiny base model (shipped in the package) unless
    `--model_name_or_path`."""
    model_path = model_args.model_name_or_path
    set_num_threads(script_args.num_threads, model_path is None, training_args.use_cpu, state.num_processes)
    if model_path is None:
        with state.main_process_first():
            model_path = get_base_model(
                task.name, build=script_args.build_base_model, progress_bar=state.is_main_process
            )
    attention = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model, tokenizer = load_model_and_tokenizer(
        model_path, dtype=model_args.dtype, revision=model_args.model_revision, **attention
    )
    return model, tokenizer, model_path


def train_until_done_or_stopped(trainer, resume, stopper) -> float:
    """`trainer.train()`; returns its seconds. When train() raises, on_train_end never runs: the caller gets its
    signal handlers back here."""
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        stopper.uninstall()
    return time.perf_counter() - started


def finish_training(trainer, tokenizer, stopper, state, say, evaluate):
    """Save and evaluate the trained model, or, when interrupted, say how to resume. Returns the evaluation."""
    out_dir = Path(trainer.args.output_dir)
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
    return after


def write_report(results: dict, trainer, script_args, title: str, state, say, start: float) -> None:
    """`results.json`, `results.md` and `training_curves.png`, and what the output folder holds."""
    out_dir = Path(trainer.args.output_dir)
    if state.is_main_process:
        plot = None
        if script_args.plot:
            plot = plot_training_curves(trainer.state.log_history, out_dir / "training_curves.png", title=title)
        results["training_curves"] = str(plot) if plot else None
        results["total_seconds"] = round(time.perf_counter() - start, 1)
        before, after, k = results["before"], results["after"], results["k"]
        table = results_table(before, after, k) if (before or after) else "(no evaluation)"
        write_results(out_dir, results, table, title)
        note = (
            "\n\nBefore training the numbers are fixed by the base weights and the seed; after training they also "
            "depend on the CPU and the torch thread count (float rounding leads training along another trajectory): "
            "measured lines in "
            "benchmarks/results/README.md of pbsd-trl."
            if after
            else ""
        )
        say(f"\n{table}{note}\n\n{output_listing(out_dir)}\n[pbsd] Total time {results['total_seconds']:.0f} s")
    state.wait_for_everyone()
