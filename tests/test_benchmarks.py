"""The benchmark scripts' smoke modes (`--quick`) run end to end and write their reports and plots."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
LEARNING_METHODS = ("base", "GRPO", "OPSD", "SDFT", "PBSD-role", "PBSD-reward")


def run_quick(script, *args, timeout):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *map(str, args)],
        check=True,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.mark.slow
def test_logprob_kernel_quick(tmp_path):
    run_quick("bench_logprob_kernel.py", "--sweep", "--reps", 1, "--out-dir", tmp_path, timeout=600)
    for suffix in (".md", ".json", "_sweep.json"):
        assert (tmp_path / f"logprob_kernel{suffix}").stat().st_size > 0
    pytest.importorskip("matplotlib")
    assert (tmp_path / "logprob_kernel.png").stat().st_size > 0


@pytest.mark.slow
def test_learning_quick(tmp_path):
    run_quick("learning.py", "--output_dir", tmp_path, timeout=1200)
    md = (tmp_path / "learning.md").read_text()
    for name in ("learning.json", "learning_curves.png", "learning_stability.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for method in LEARNING_METHODS:
        assert f"| {method} | 1 |" in md, method
    assert "## Verdicts" in md and "## Errors" not in md
    payload = json.loads((tmp_path / "learning.json").read_text())
    assert payload["config"]["quick"]
    for run in payload["runs"]:
        assert run["final"] is not None and run["tokens"] >= payload["config"]["budget_tokens"], run["method"]
        if run["method"].startswith("PBSD"):
            assert run["teacher_tokens"] > 0
        else:
            assert run["teacher_tokens"] == 0


@pytest.mark.slow
def test_step_cost_quick(tmp_path):
    run_quick("step_cost.py", "--output_dir", tmp_path, timeout=900)
    md = (tmp_path / "step_cost.md").read_text()
    payload = json.loads((tmp_path / "step_cost.json").read_text())
    assert "| GRPO G=8 |" in md and "| PBSD 4+4 |" in md and "Verdict" in md
    assert payload["quick"] and payload["results"]
    for result in payload["results"]:
        names = {c["name"]: c for c in result["contenders"]}
        assert {"GRPO G=8", "PBSD 4+4", "PBSD 4+4 TRL head", "PBSD 8+8"} <= set(names)
        for contender in names.values():
            assert contender["median_s"]["wall"] > 0 and contender["median_s"]["cpu"] > 0
            assert contender["median_extra_peak_bytes"] >= 0
        assert names["PBSD 4+4"]["median_breakdown_s"]["cpu"]["gen_teacher"] > 0
        assert names["PBSD 4+4"]["median_breakdown_s"]["cpu"]["teacher_scoring"] > 0
        assert names["GRPO G=8"]["median_breakdown_s"]["cpu"]["teacher_scoring"] == 0
        assert names["GRPO G=8"]["time_ratio"] == {"wall": 1.0, "cpu": 1.0}
        # the pool contenders take the teacher's samples from the pool built before the rounds: no teacher generate
        assert result["pool_build"]["tokens"] > 0 and result["pool_build"]["rows"] > 0
        assert names["PBSD 4+4 pool"]["median_breakdown_s"]["cpu"]["gen_teacher"] == 0
        assert names["PBSD 4+4"]["median_breakdown_s"]["cpu"]["gen_teacher"] > 0
        assert names["PBSD 4+4 LoRA 1-pass"]["time_ratio_vs"]["LoRA GRPO G=8"]["cpu"] > 0


# ---- benchmarks/learning_tuned.py: the protocol's pieces, without training ----------------------------------------


def _bench(module: str):
    """A module of `benchmarks/` (a script, its report, or a harness module), imported as the scripts import it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(module)


def _learning_tuned():
    return _bench("learning_tuned")


@pytest.mark.parametrize("task", ["math", "tool_use"])
def test_tuned_splits_are_disjoint_halves(task):
    lt = _learning_tuned()
    val, test = lt.eval_splits(task, 100, 100)
    assert len(val) == len(test) == 100
    val_prompts = {_bench("harness.splits").prompt_text(p) for p in val["prompt"]}
    test_prompts = {_bench("harness.splits").prompt_text(p) for p in test["prompt"]}
    assert len(val_prompts) == len(test_prompts) == 100 and not val_prompts & test_prompts
    with pytest.raises(AssertionError, match="share 1 prompts"):
        _bench("harness.splits").check_disjoint(val.select(range(3)), val.select(range(2, 5)))
    with pytest.raises(ValueError, match="at most 100"):
        lt.eval_splits(task, 101, 10)


def test_tuned_grids_have_equal_size():
    lt = _learning_tuned()
    for task in lt.TASK_NAMES:
        sizes = {m: len(lt.tuning_grid(m, task)) for m in lt.METHODS}
        assert set(sizes.values()) == {len(lt.LEARNING_RATES) * 2} and min(sizes.values()) >= 4, sizes
        for m in lt.METHODS:
            knob = _bench("harness.methods").KNOBS[m][0]
            grid = lt.tuning_grid(m, task)
            assert len({(c["learning_rate"], c[knob]) for c in grid}) == len(grid), m  # no duplicate configuration
    # every PBSD variant is a method of its own, with β as its knob on the task's own scale
    assert (
        set(_bench("harness.methods").PBSD_METHODS)
        == {"PBSD", "PBSD-soft", "PBSD-reward", "PBSD-tilted"}
        <= set(lt.METHODS)
    )
    assert lt.parse_args([]).methods == list(lt.METHODS)
    for m in _bench("harness.methods").PBSD_METHODS:
        assert _bench("harness.methods").knob_values(m, "math") == ("pbsd_beta", (0.05, 0.1))
        assert _bench("harness.methods").knob_values(m, "tool_use") == ("pbsd_beta", (0.3, 0.5))
    ablation = lt.ablation_config(
        {"learning_rate": 1e-4, "pbsd_beta": 0.1}, lt.ABLATIONS["length-normalized (β x 40)"]
    )
    assert ablation == {"learning_rate": 1e-4, "pbsd_beta": 4.0, "length_normalize": True}
    assert set(lt.DIAGNOSTIC_ARMS) <= set(lt.ABLATIONS)
    assert {lt.ABLATIONS[a]["pbsd_loss_type"] for a in lt.DIAGNOSTIC_ARMS} == {
        "teacher_sft",
        "constant_student_weight",
        "kl_regularized_pg",
    }


@pytest.mark.parametrize("task", ["math", "tool_use"])
def test_tuned_every_pbsd_configuration_is_a_valid_config(task, tmp_path):
    """Each PBSD method's grid and each ablation on the headline build a `PBSDConfig` (its checks pass)."""
    lt = _learning_tuned()
    settings = lt.task_settings(lt.parse_args(["--output_dir", str(tmp_path)]), task)
    for m in _bench("harness.methods").PBSD_METHODS:
        for config in lt.tuning_grid(m, task):
            args = _bench("harness.methods").trainer_args(task, m, config, settings, 0, str(tmp_path))
            assert type(args).__name__ == "PBSDConfig" and args.pbsd_beta == config["pbsd_beta"]
            for field, value in lt.METHOD_FIXED[m].items():
                assert getattr(args, field) == value, (m, field)
    headline = lt.tuning_grid("PBSD", task)[0]
    for name, overrides in lt.ABLATIONS.items():
        args = _bench("harness.methods").trainer_args(
            task, "PBSD", lt.ablation_config(headline, overrides), settings, 0, str(tmp_path)
        )
        assert args.pair_labels in ("role", "reward"), name
    assert (
        _bench("harness.methods")
        .trainer_args(task, "GRPO", lt.tuning_grid("GRPO", task)[0], settings, 0, str(tmp_path))
        .beta
        == 0.0
    )


def test_tuned_pbsd_variants_are_treated_alike():
    lt = _learning_tuned()
    settings = {"prompts_per_step": 8, "num_generations": 8}
    for m in _bench("harness.methods").PBSD_METHODS:
        assert lt.is_pbsd(m) and lt.teacher_samples_per_step(m, {}, settings) == 64
    assert lt.teacher_samples_per_step("PBSD", {"num_teacher_generations": 2}, settings) == 16
    assert not lt.is_pbsd("GRPO") and lt.teacher_samples_per_step("GRPO", {}, settings) == 0
    # costs: a variant without stored runs of its own borrows PBSD's, plus the partner pass of union pairing
    costs = {("math", "PBSD"): {"seconds_per_step": 2.0, "tokens_per_step": 5000, "eval_seconds_per_100": 9.0}}
    assert lt.step_costs("math", "PBSD", {}, costs)[:3] == (2.0, 5000, 9.0)
    assert lt.step_costs("math", "PBSD-tilted", {}, costs)[0] == 2.0
    assert lt.step_costs("math", "PBSD-soft", {}, costs)[0] == pytest.approx(2.0 * lt.PARTNER_PASS_COST)
    default = lt.DEFAULT_COSTS["PBSD"]["seconds_per_step"]
    assert lt.step_costs("tool_use", "PBSD-reward", {}, costs)[0] == pytest.approx(default * lt.PARTNER_PASS_COST)
    assert lt.step_costs("math", "PBSD", {"num_teacher_generations": 2}, costs)[1] == pytest.approx(5000 * 10 / 16)
    # verdicts: every PBSD method against the non-PBSD peers, a variant also against the paper's PBSD
    assert _bench("learning_tuned_report").verdict_peers("PBSD", lt.METHODS) == ["GRPO", "OPSD", "SDFT"]
    assert _bench("learning_tuned_report").verdict_peers("PBSD-soft", lt.METHODS) == ["GRPO", "OPSD", "SDFT", "PBSD"]
    assert all(
        m in _bench("harness.methods").DESCRIPTIONS and m in _bench("harness.methods").COLORS and m in lt.METHOD_FIXED
        for m in lt.METHODS
    )


def test_tuned_long_stage_length_and_step_grid(tmp_path):
    lt = _learning_tuned()
    args = lt.parse_args(["--output_dir", str(tmp_path)])
    assert (args.long_steps, args.long_factor, args.long_seeds) == (300, 6.0, [0, 1])
    assert lt.long_steps(args, 40) == 300 and lt.long_steps(args, 61) == 366
    ctx = lt._PlanContext("math", args)
    spec = lt.long_spec(ctx, args, "PBSD-soft", {"learning_rate": 1e-4, "pbsd_beta": 0.05}, 1, 61)
    assert spec["stop"] == spec["budgets"] == {"steps": 366} and spec["eval_every_steps"] == 37
    assert spec["split"] == "test" and spec["seed"] == 1
    # the stored runs' keys are those of specifications without `eval_every_steps`
    test = lt.test_spec(ctx, args, "PBSD", {"learning_rate": 1e-4, "pbsd_beta": 0.05}, 0)
    assert "eval_every_steps" not in test and lt.PROTOCOL_VERSION == 1
    # the length follows the headline-selected configuration's first test seed at the token budget
    config = {"learning_rate": 1e-4}
    run = {"seed": 0, "points": [{"step": 5}, {"step": 9}], "marks": {"tokens": 1}}
    task_out = {"selected": {"GRPO": {"time": (config, 0.5)}}, "test": {"GRPO": [{"config": config, "runs": [run]}]}}
    assert lt.tokens_budget_steps(task_out, "GRPO", 0) == 9 and lt.tokens_budget_steps(task_out, "GRPO", 1) is None

    # the step grid evaluates every `eval_every_steps` and at the `steps` mark
    evaluated = []

    class State:
        global_step = 0

    callback = _bench("harness.budgets").BudgetCounter(
        teacher_per_step=0,
        student_per_step=8,
        budgets={"steps": 7},
        stop={"steps": 7},
        eval_every_tokens=None,
        eval_every_steps=3,
        evaluate=lambda m: (
            evaluated.append(State.global_step) or {"avg_at_k": 0.1, "pass_at_k": 0.2, "mean_completion_tokens": 5.0}
        ),
        clock=lt.Clock("wall"),
    )

    class Control:
        should_training_stop = False

    control = Control()
    for step in range(1, 8):
        State.global_step = step
        callback.on_log(None, State, control, logs={"completions/mean_length": 5.0})
    assert evaluated == [3, 6, 7] and control.should_training_stop and callback.marks == {"steps": 2}


def test_tuned_run_cache_keys_and_resume(tmp_path):
    lt = _learning_tuned()
    spec = {"task": "math", "method": "PBSD", "config": {"learning_rate": 1e-4, "pbsd_beta": 0.1}, "seed": 0}
    reordered = {"seed": 0, "config": {"pbsd_beta": 0.1, "learning_rate": 1e-4}, "method": "PBSD", "task": "math"}
    assert _bench("harness.runs").run_key(spec) == _bench("harness.runs").run_key(reordered)
    assert _bench("harness.runs").run_key(spec) != _bench("harness.runs").run_key({**spec, "seed": 1})
    assert _bench("harness.runs").run_key(spec) != _bench("harness.runs").run_key(
        {**spec, "config": {"learning_rate": 3e-4, "pbsd_beta": 0.1}}
    )

    cache = lt.RunCache(tmp_path)
    args = lt.parse_args(["--output_dir", str(tmp_path)])
    runner = lt.Runner(args, cache)
    calls = []

    def fake_execute(ctx, spec, desc):
        calls.append(desc)
        return {"steps": 3, "points": [{"avg_at_8": 0.5}], "marks": {"tokens": 0}}

    original = lt.execute_train
    lt.execute_train = fake_execute
    try:
        train = {**spec, "kind": "train"}
        first = runner.get(None, train, "run a")
        again = lt.Runner(args, cache).get(None, train, "run a again")  # a new invocation: served from disk
    finally:
        lt.execute_train = original
    assert calls == ["run a"] and first["steps"] == again["steps"] == 3
    stored = tmp_path / "math" / f"{_bench('harness.runs').run_key(train)}.json"
    assert stored.is_file()
    stored.write_text(json.dumps({"spec": {**train, "seed": 9}}))
    with pytest.raises(RuntimeError, match="stored specification differs"):
        cache.get(train)


def test_tuned_budget_callback_marks_each_budget_at_its_first_step():
    lt = _learning_tuned()
    from transformers import TrainerControl, TrainerState

    class FakeClock:
        kind = "cpu"
        t = 0.0

        def now(self):
            return self.t

    clock = FakeClock()
    evaluated = []

    def evaluate(model):
        clock.t += 100.0  # evaluation time must not count as training time
        evaluated.append(state.global_step)
        return {"avg_at_k": state.global_step / 10, "pass_at_k": 1.0, "mean_completion_tokens": 10.0}

    callback = lt.make_budget_callback(
        teacher_per_step=16,
        student_per_step=64,
        budgets={"tokens": 2000.0, "time": 5.0, "steps": 4},
        stop={"tokens": 3000.0, "time": 5.0, "steps": 4},
        eval_every_tokens=1500.0,
        evaluate=evaluate,
        clock=clock,
    )
    state, control = TrainerState(), TrainerControl()
    for step in range(1, 10):
        state.global_step = step
        clock.t += 2.0  # 2 s of training per step
        # 64 student samples of 10 tokens and 16 teacher samples of 20 tokens: 960 tokens per step
        callback.on_log(
            None, state, control, logs={"completions/mean_length": 10.0, "pbsd/teacher_completions/mean_length": 20.0}
        )
        if control.should_training_stop:
            break
    assert callback.tokens == 960 * step and callback.teacher_tokens == 320 * step
    assert step == 4  # tokens 3000 reached at step 4 (3840), time 5 s at step 3, steps at 4
    marks = {b: callback.points[i]["step"] for b, i in callback.marks.items()}
    assert marks == {"tokens": 3, "time": 3, "steps": 4}  # 2880 ≥ 2000 first at step 3; 6 s ≥ 5 s at step 3
    assert evaluated == [2, 3, 4]  # token grid at 1500 (step 2), budgets at 3, grid 3000 + steps at 4
    assert callback.points[1]["train_seconds"] == pytest.approx(6.0)
    with pytest.raises(RuntimeError, match="no teacher completion lengths"):
        callback.on_log(None, state, control, logs={"completions/mean_length": 10.0})


def test_tuned_selection_uses_validation_at_each_budget():
    lt = _learning_tuned()

    def record(values):
        points = [{"avg_at_8": v} for v in values]
        return {"points": points, "marks": {b: i for i, b in enumerate(lt.BUDGETS)}}

    records = [
        ({"config": {"lr": 1}}, record([0.3, 0.5, 0.2])),
        ({"config": {"lr": 2}}, record([0.4, 0.5, 0.1])),
        ({"config": {"lr": 3}}, record([0.1, 0.1, 0.6])),
    ]
    assert lt.select(records, "tokens") == ({"lr": 2}, 0.4)
    assert lt.select(records, "time") == ({"lr": 1}, 0.5)  # a tie goes to the first in grid order
    assert lt.select(records, "steps") == ({"lr": 3}, 0.6)
    with pytest.raises(ValueError, match="no finished validation run"):
        lt.select([], "tokens")


def test_tuned_diagnostics_average_the_window_before_the_budget_and_verdicts_need_two_seeds():
    w = _bench("learning_tuned_report").DIAGNOSTIC_WINDOW

    def run(offset, budget_step):
        steps = list(range(1, 3 * w + 1))
        return {
            "history": {"step": steps, "reward": [offset + st for st in steps]},
            "points": [{"step": budget_step, "avg_at_8": 0.5}],
            "marks": {"time": 0},
        }

    # steps 1..w average (w+1)/2; the last w steps up to step 2w average 1.5w+0.5; steps after the budget ignored
    diag = _bench("learning_tuned_report").training_diagnostics([run(0.0, 2 * w), run(1.0, 2 * w)], "time")
    first, last, n = diag["reward"]
    assert n == 2 and first == pytest.approx((w + 1) / 2 + 0.5) and last == pytest.approx(1.5 * w + 0.5 + 0.5)
    assert "pbsd/margin" not in diag  # not logged: absent, not zero
    # shorter than two windows: its two halves (steps 1..3 and 4..6 of a 6-step run)
    assert _bench("learning_tuned_report").training_diagnostics([run(0.0, 6)], "time")["reward"] == (2.0, 5.0, 1)
    assert (
        _bench("learning_tuned_report").training_diagnostics([run(0.0, 3)], "time") == {}
    )  # too short for two windows of 2 steps

    def arm(values):
        return [{"points": [{"avg_at_8": v}], "marks": {"time": 0}} for v in values]

    config = {"learning_rate": 1e-4}
    task_out = {
        "selected": {m: {"time": (config, 0.0)} for m in ("PBSD", "GRPO", "SDFT")},
        "test": {
            "PBSD": [{"config": config, "runs": arm([0.40, 0.42, 0.41])}],
            "GRPO": [{"config": config, "runs": arm([0.50, 0.52, 0.51])}],
            "SDFT": [{"config": config, "runs": arm([0.30])}],
        },
    }
    out = _bench("learning_tuned_report").verdicts(task_out, ["GRPO", "SDFT", "PBSD"], "time")
    assert out["GRPO"][0] == "lost" and out["GRPO"][1] == pytest.approx(-0.10) and out["GRPO"][3] < 0.01
    assert out["GRPO"][2] == pytest.approx(0.02)  # std sum: 0.01 + 0.01
    assert out["SDFT"] == ("pending", None, None, None) and "PBSD" not in out

    # PBSD with a teacher pool decides the time verdicts when it reaches more steps in the budget, never otherwise
    def pooled(values, steps):
        return [{"points": [{"avg_at_8": v, "step": steps}], "marks": {"time": 0}} for v in values]

    for runs in task_out["test"]["PBSD"][0]["runs"]:
        runs["points"][0]["step"] = 40
    task_out["pooled"] = {"config": config, "runs": pooled([0.60, 0.61, 0.62], steps=39)}
    assert _bench("learning_tuned_report").pbsd_time_execution(task_out)[0] == "online"
    assert _bench("learning_tuned_report").verdicts(task_out, ["GRPO", "PBSD"], "time")["GRPO"][0] == "lost"
    task_out["pooled"] = {"config": config, "runs": pooled([0.60, 0.61, 0.62], steps=55)}
    assert _bench("learning_tuned_report").pbsd_time_execution(task_out)[0] == "teacher pool"
    assert _bench("learning_tuned_report").verdicts(task_out, ["GRPO", "PBSD"], "time")["GRPO"][0] == "beat"
    task_out["pooled"]["runs"] = task_out["pooled"]["runs"][:2]  # fewer seeds than online: not a comparison
    assert _bench("learning_tuned_report").pbsd_time_execution(task_out)[0] == "online"


def test_tuned_plan_estimates_every_stage(tmp_path):
    lt = _learning_tuned()
    text = lt.plan(lt.parse_args(["--output_dir", str(tmp_path)]), tmp_path / "empty-cache")
    for task in ("math", "tool_use"):
        assert f"| {task} | tuning (validation, seed 0; 7 methods) | 28 |" in text
        assert f"| {task} | test (3 seeds; 1-3 configurations per method) | 21-63 |" in text
        assert f"| {task} | PBSD ablations (3 of them diagnostic arms) | 21 |" in text
        assert f"| {task} | PBSD with a teacher pool (time budget) | 3 |" in text
        assert f"| {task} | long horizon (seeds [0, 1]; steps: GRPO " in text
    # DEFAULT_COSTS: 2660 tokens per step, 53 steps to 140k tokens, 6 x 53 = 318 > 300
    assert "GRPO 318" in text and "PBSD-tilted 300" in text
    assert "pbsd_beta` in [0.05, 0.1]" in text and "pbsd_beta` in [0.3, 0.5]" in text
    assert "DEFAULT_COSTS" in text and "sessions of 170 minutes" in text
    assert lt.planned_run_count(lt.parse_args([])) == 2 * (28 + 7 * (3 + 2) + 21 + 3)


def _fake_run(lt, seed, score, steps=40, history=True):
    """A stored test run's shape: points at steps 10, 20, .., `steps`, every budget marked at the last point."""
    points = [
        {"step": st, "tokens": 1000.0 * st, "train_seconds": 2.0 * st, "avg_at_8": score + 0.001 * st / steps}
        for st in range(10, steps + 1, 10)
    ]
    run = {"seed": seed, "points": points, "marks": {b: len(points) - 1 for b in lt.BUDGETS}, "steps": steps}
    if history:
        keys = ("pbsd/identical_frac", "pbsd/tie_frac", "pbsd/preference_accuracy", "pbsd/weight_reward_corr")
        run["history"] = {"step": list(range(1, steps + 1)), **{k: [0.1] * steps for k in keys}}
    return run


def _fake_task(lt, task, methods):
    base = [{"seed": s, "avg_at_8": 0.1} for s in (0, 1, 2)]
    out = {"task": task, "model_path": "m", "base": base, "teacher": {"avg_at_8": 0.6}, "tuning": {}, "selected": {}}
    out.update(test={}, ablations={}, pooled=None, long={})
    for i, m in enumerate(methods):
        config = lt.tuning_grid(m, task)[0]
        out["selected"][m] = dict.fromkeys(lt.BUDGETS, (config, 0.3))
        out["tuning"][m] = [{"config": config, "val": dict.fromkeys(lt.BUDGETS, 0.3), "steps": 40}]
        out["test"][m] = [
            {"config": config, "runs": [_fake_run(lt, s, 0.3 + 0.01 * i + 0.002 * s) for s in (0, 1, 2)]}
        ]
        out["long"][m] = {"config": config, "steps": 300, "runs": [_fake_run(lt, s, 0.4, steps=300) for s in (0, 1)]}
    out["headline_pbsd"] = out["selected"]["PBSD"]["time"][0]
    scores = {"SFT on teacher samples only": 0.3 + 0.03, "student-sample weight constant": 0.9}
    for name, score in scores.items():  # the first arm as PBSD (index 3 of METHODS), the second far off
        out["ablations"][name] = {"config": {}, "runs": [_fake_run(lt, s, score + 0.002 * s) for s in (0, 1, 2)]}
    return out


def test_tuned_report_covers_every_stage(tmp_path):
    """The report and the PNGs from a synthetic payload: every method, the arms, the long stage, the summary."""
    lt = _learning_tuned()
    args = lt.parse_args(["--output_dir", str(tmp_path)])
    config = {k: v for k, v in vars(args).items() if k not in ("output_dir", "plan")}
    payload = {
        "command": "python benchmarks/learning_tuned.py",
        "started": "now",
        "machine": {"cpu": "test"},
        "config": config,
        "tasks": [_fake_task(lt, t, lt.METHODS) for t in lt.TASK_NAMES],
        "executed": 0,
        "errors": [],
        "total_seconds": 1.0,
        "partial": None,
    }
    payload["tasks"][0]["model_quality"] = {"teacher_avg_at_8_test": 0.861, "teacher_self_log_prob_test": -0.59}
    payload["tasks"][0]["settings"] = {"max_completion_length": 56}
    plots = lt.plot(payload, tmp_path, "learning")
    lt.write_report(tmp_path / "learning.md", payload, plots)
    md = (tmp_path / "learning.md").read_text()
    # the task table: what the manifest records beside what the benchmark measured within its budget
    task_rows = [
        line for line in md.split("## The tasks")[1].split("## Protocol")[0].splitlines() if line[:3] == "| m"
    ]
    assert task_rows[0].startswith("| math | 0.861 | – | -0.59 | – / – | 56 |"), task_rows
    for t in lt.TASK_NAMES:
        assert f"### {t}: long horizon" in md and f"### {t}: training diagnostics (long-horizon runs" in md
    assert md.count("**PBSD-role behaves as SFT on teacher samples here.**") == 2
    assert md.count("- student-sample weight constant: PBSD-role") == 2 and "outside seed spread" in md
    assert "  - `PBSD-soft`: learning_rate in [0.0001, 0.0003] x `pbsd_beta` in [0.05, 0.1]" in md
    assert "  - `PBSD-soft`: learning_rate in [0.0001, 0.0003] x `pbsd_beta` in [0.3, 0.5]" in md
    assert "| math | PBSD-reward | vs GRPO " in md and "| PBSD-tilted | PBSD |" in md
    # the pair metrics: one column each, start → end of the runs
    header = next(line for line in md.splitlines() if line.startswith("| method | seeds | "))
    assert all(f" {c} |" in header for c in ("pref. acc.", "identical", "ties", "w–r corr."))
    assert "| PBSD-reward | 3 | 0.100 → 0.100 | 0.100 → 0.100 |" in md and "| GRPO | 2 | 0.100 → 0.100 |" in md
    # long horizon: best 0.401 (end), end − best 0 for every method and seed
    assert "| PBSD-soft | learning_rate=0.0001, pbsd_beta=0.05 | 300 | 2 | 0.401 ± 0.000 | 0.401 ± 0.000 |" in md
    pytest.importorskip("matplotlib")
    for name in ("learning_math.png", "learning_long_math.png", "learning_long_tool_use.png", "learning_summary.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "![summary](learning_summary.png)" in md


@pytest.mark.slow
def test_learning_tuned_quick_resumes_from_cache(tmp_path):
    run_quick("learning_tuned.py", "--output_dir", tmp_path, "--tasks", "math", timeout=1200)
    md = (tmp_path / "learning.md").read_text()
    payload = json.loads((tmp_path / "learning.json").read_text())
    assert (
        md.startswith("# Tuned learning benchmark") and "Command: `python benchmarks/learning_tuned.py --quick" in md
    )
    assert payload["executed"] > 0 and not payload["errors"] and payload["partial"] is None
    (task,) = payload["tasks"]
    assert set(task["selected"]) == {"GRPO", "OPSD", "SDFT", "PBSD", "PBSD-soft", "PBSD-reward", "PBSD-tilted"}
    for method in task["selected"]:
        for budget in ("tokens", "time", "steps"):
            assert (
                f"### math: {['equal generated tokens', 'equal training time', 'equal optimizer steps'][['tokens', 'time', 'steps'].index(budget)]}"
                in md
            )
        for entry in task["test"][method]:
            assert [r["seed"] for r in entry["runs"]] == [0, 1]
            assert all(set(r["marks"]) == {"tokens", "time", "steps"} for r in entry["runs"])
    assert set(task["ablations"]) == {
        "SFT on teacher samples only",
        "student-sample weight constant",
        "KL-regularized policy gradient",
    }
    assert all(len(e["runs"]) == 2 for e in task["ablations"].values())
    assert "- SFT on teacher samples only: PBSD-role" in md
    # the long horizon: every method's time-selected configuration, 2 seeds, evaluated on a step grid to its end
    assert set(task["long"]) == set(task["selected"])
    for entry in task["long"].values():
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        assert all(r["points"][-1]["step"] == entry["steps"] == r["steps"] for r in entry["runs"])
    assert "### math: long horizon" in md
    # PBSD at the time budget with a teacher pool, built inside the run for the rows of the online run's steps
    pooled = task["pooled"]["runs"]
    assert [r["seed"] for r in pooled] == [0, 1] and all(set(r["marks"]) == {"time"} for r in pooled)
    assert all(r["teacher_pool"]["rows"] > 0 and 0 < r["teacher_pool"]["seconds"] < r["train_seconds"] for r in pooled)
    assert "| PBSD, teacher pool |" in md
    pytest.importorskip("matplotlib")
    for name in ("learning_math.png", "learning_long_math.png", "learning_summary.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    # A second invocation finds every run on disk
    run_quick("learning_tuned.py", "--output_dir", tmp_path, "--tasks", "math", timeout=600)
    assert json.loads((tmp_path / "learning.json").read_text())["executed"] == 0


@pytest.mark.slow
def test_learning_diagnosis_quick(tmp_path):
    run_quick("learning_diagnosis.py", "--output_dir", tmp_path, "--variants", "role", "reward-drop", timeout=900)
    md = (tmp_path / "learning_diagnosis.md").read_text()
    assert "| PBSD role labels (default job) |" in md and "| PBSD reward labels, ties dropped |" in md
    payload = json.loads((tmp_path / "learning_diagnosis.json").read_text())
    for summary in payload["summaries"].values():
        assert set(summary["delta_logp"]) and "0" in {str(k) for k in summary["delta_logp"]}


@pytest.mark.slow
def test_pool_batch_size_quick(tmp_path):
    run_quick("pool_batch_size.py", "--output_dir", tmp_path, timeout=600)
    rows = [line for line in (tmp_path / "pool_batch_size_quick.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| completions per call |")
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| 8", "| 32"]
    assert rows[1].endswith("| 1.00x |")  # the reference size (the first, without 256) against itself
    for row in rows[1:]:
        assert float(row.split(" | ")[2]) > 0  # tokens per second


def test_untuned_methods_are_harness_methods_with_their_own_settings(tmp_path):
    """`benchmarks/learning.py` builds its five methods through the harness: the settings its report describes."""
    learning, methods = _bench("learning"), _bench("harness.methods")
    settings = {"prompts_per_step": 2, "num_generations": 4, "max_completion_length": 16}
    expected = {
        "GRPO": {"loss_type": "dapo", "beta": 0.0},
        "OPSD": {"distillation_mode": "full_logits", "distillation_alpha": 0.0, "teacher_model_kind": "base"},
        "SDFT": {"distillation_mode": "topk_logits", "distillation_alpha": 0.5, "teacher_model_kind": "base"},
        "PBSD-role": {"pair_labels": "role", "pairing": "matched", "pbsd_beta": 0.1, "teacher_model_kind": "base"},
        "PBSD-reward": {"pair_labels": "reward", "pairing": "matched", "tie_policy": "role", "pbsd_beta": 0.1},
    }
    assert set(expected) == set(learning.METHODS) == set(learning.HARNESS_METHODS)
    for method, fields in expected.items():
        name, config, fixed = learning.HARNESS_METHODS[method]
        config = {"learning_rate": 1e-4, **config, **({"pbsd_beta": 0.1} if methods.is_pbsd(name) else {})}
        args = methods.trainer_args("math", name, config, settings, 0, str(tmp_path), fixed)
        assert {k: getattr(args, k) for k in fields} == fields, method
        assert args.learning_rate == 1e-4 and args.lr_scheduler_type == "constant"


def test_tuned_completion_length_per_task_enters_the_task_settings():
    """One `--max_completion_length` for every task or one per task: each task's runs keep the length they ran with."""
    lt = _learning_tuned()
    per_task = lt.parse_args(["--max_completion_length", "math=56"])
    assert lt.task_settings(per_task, "math")["max_completion_length"] == 56
    from pbsd_trl.recipes.data.tasks import TASKS

    own = TASKS["tool_use"].max_completion_length
    assert lt.task_settings(per_task, "tool_use")["max_completion_length"] == own
    every = lt.parse_args(["--max_completion_length", "40"])
    assert {t: lt.task_settings(every, t)["max_completion_length"] for t in lt.TASK_NAMES} == dict.fromkeys(
        lt.TASK_NAMES, 40
    )
    for bad in (["maths=56"], ["math=0"], ["math=x"], ["56", "64"]):
        with pytest.raises(SystemExit):
            lt.parse_args(["--max_completion_length", *bad])
