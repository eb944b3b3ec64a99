"""Hostile inputs to the newer features (teacher-sample pool, agents and environments, odd contexts, resume): each
gets an error naming the problem before any update, or behaves as it should.

The tool-call timeout and environment-reward cases need a tool-calling chat template: they use `tool_tokenizer` from
testing_utils, with a random model (the rollouts are scripted or the tool is called by hand) or the one warm-started
in test_agent.py.
"""

import copy
import json
import os
import re
import sys
import threading
import time

import pytest
import torch
from datasets import Dataset, IterableDataset
from testing_utils import TEMPLATE, ScriptedAnswerTrainer, multiply, tiny_pbsd_config, tool_tokenizer

from pbsd_trl import PBSDTrainer
from pbsd_trl.pool import POOL_STAMP_FILE, TeacherPool, TeacherPoolError, build_teacher_pool, weights_fingerprint
from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import build_random_model


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INVISIBLE = ["\u200b\u200b", "\x00", "\x1b[0m", "\x1b[31m \x1b[0m", "\ufeff\u2060\u200d", "\u3164"]


def contains_answer(completions, answer, **kwargs):
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer, strict=True)]


def make_args(tmp_path, output_dir=None, **kwargs):
    kwargs = {"teacher_prompt_template": TEMPLATE, "max_steps": 1, **kwargs}
    return tiny_pbsd_config(output_dir or tmp_path / "out", **kwargs)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(before, model):
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.fixture(scope="module")
def dataset():
    return make_math_dataset("train", n=4, seed=0)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_random_model(tokenizer, seed=1)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory, model, tokenizer, dataset):
    path = str(tmp_path_factory.mktemp("pool") / "pool")
    args = make_args(tmp_path_factory.mktemp("a"))
    build_teacher_pool(copy.deepcopy(model), tokenizer, dataset, path, args, 4, batch_size=16, progress=False)
    return path


def pool_trainer(tmp_path, net, tokenizer, data, pool, **kwargs):
    args = make_args(tmp_path, teacher_pool=pool, **kwargs)
    return PBSDTrainer(net, contains_answer, args=args, train_dataset=data, processing_class=tokenizer)


# ---- the pool's stamp: everything that changes the teacher's log-probs ---------------------------------------------
def test_pool_of_the_same_weights_under_another_rope_scaling_is_refused(tmp_path, model, tokenizer, dataset, pool_dir):
    """The weights fingerprint skips the rotary buffers: the model configuration must be in the stamp."""
    rope = dict(model.config.rope_parameters, rope_type="linear", factor=4.0)
    other = build_random_model(tokenizer, seed=1, rope_parameters=rope)
    assert weights_fingerprint(other) == weights_fingerprint(model)  # the same weights, other log-probs
    ids = torch.tensor([tokenizer("12+34=46. " * 6)["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, other(ids).logits, atol=1e-3)
    before = snapshot(other)
    with pytest.raises(TeacherPoolError, match="model_config \\(the model configuration differs"):
        pool_trainer(tmp_path, other, tokenizer, dataset, pool_dir)
    assert unchanged(before, other)


def test_pool_of_another_precision_is_refused(tmp_path, model, tokenizer, dataset, pool_dir):
    with pytest.raises(TeacherPoolError, match="mixed_precision: pool 'no', this run 'bf16'"):
        pool_trainer(tmp_path, copy.deepcopy(model), tokenizer, dataset, pool_dir, bf16=True)
    with pytest.raises(TeacherPoolError, match="dtype: pool 'torch.float32', this run 'torch.bfloat16'"):
        pool_trainer(tmp_path, copy.deepcopy(model).to(torch.bfloat16), tokenizer, dataset, pool_dir)


def test_pool_build_refuses_fp16(tmp_path, model, tokenizer, dataset):
    args = make_args(tmp_path)
    args.fp16 = True  # the CPU refuses fp16 at construction: set it as a GPU run would have it
    with pytest.raises(ValueError, match="fp16"):
        build_teacher_pool(copy.deepcopy(model), tokenizer, dataset, str(tmp_path / "p"), args, 4, progress=False)


# ---- the pool's visit counters across a resume ---------------------------------------------------------------------
@pytest.mark.slow
def test_resumed_run_takes_the_pool_samples_of_an_uninterrupted_run(tmp_path, model, tokenizer, monkeypatch):
    """Two prompts, both in every step; K=16 samples, 4 per visit: steps 1-4 take four disjoint quarters."""
    data = make_math_dataset("train", n=2, seed=0)
    pool = str(tmp_path / "pool")
    build_teacher_pool(copy.deepcopy(model), tokenizer, data, pool, make_args(tmp_path), 16, progress=False)
    draws = []
    original = TeacherPool.draw

    def recorded(self, keys, positions, groups):
        ids, logps = original(self, keys, positions, groups)
        draws.append(sorted(zip(keys, map(tuple, ids), strict=True)))
        return ids, logps

    monkeypatch.setattr(TeacherPool, "draw", recorded)
    run = dict(max_steps=4, save_strategy="steps", save_steps=2, output_dir=str(tmp_path / "run"))
    pool_trainer(tmp_path, copy.deepcopy(model), tokenizer, data, pool, **run).train()
    uninterrupted, draws[:] = list(draws), []
    assert len(uninterrupted) == 4 and uninterrupted[2] != uninterrupted[0]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = pool_trainer(tmp_path, copy.deepcopy(model), tokenizer, data, pool, **run)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert draws == uninterrupted[2:]  # sample for sample
    # each of this one process's two keys was visited twice by step 2
    state = json.loads((checkpoint / "pbsd_pool_state.json").read_text())
    assert state["visits"] == [dict.fromkeys({key for key, _ in uninterrupted[0]}, 2)]


# ---- a damaged pool ------------------------------------------------------------------------------------------------
def _damaged_copy(pool_dir, tmp_path, name):
    import shutil

    target = tmp_path / "damaged"
    shutil.copytree(pool_dir, target)
    path = target / name if name else next((target / "data").glob("*.arrow"))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return str(target), str(path)


@pytest.mark.parametrize("name", [None, POOL_STAMP_FILE, "data/state.json"])
def test_damaged_pool_is_named_with_the_fix(tmp_path, model, tokenizer, dataset, pool_dir, name):
    folder, path = _damaged_copy(pool_dir, tmp_path, name)
    with pytest.raises(TeacherPoolError) as err:
        pool_trainer(tmp_path, copy.deepcopy(model), tokenizer, dataset, folder)
    message = str(err.value)
    assert (path if name == POOL_STAMP_FILE else os.path.join(folder, "data")) in message, message
    assert "damaged or truncated" in message and "Rebuild the pool" in message, message


def test_damaged_pool_part_is_named_when_the_build_resumes(tmp_path, model, tokenizer, dataset):
    args, folder = make_args(tmp_path), str(tmp_path / "pool")
    build = lambda **kw: build_teacher_pool(  # noqa: E731
        copy.deepcopy(model), tokenizer, dataset, folder, args, 4, batch_size=8, progress=False, **kw
    )
    assert build(stop_after_batches=1) is None
    (part,) = (tmp_path / "pool" / "parts").glob("*.parquet")
    with open(part, "r+b") as f:
        f.truncate(part.stat().st_size // 2)
    with pytest.raises(TeacherPoolError, match=f"{re.escape(str(part))}.*damaged or truncated.*Delete this part"):
        build()


# ---- the pool build applies the trainer's checks before sampling ---------------------------------------------------
def _never_sample(monkeypatch):
    from pbsd_trl import sampling

    def refuse(*args, **kwargs):
        raise AssertionError("the build sampled before checking the rows")

    monkeypatch.setattr(sampling.HFSampler, "sample", refuse)


def test_pool_build_refuses_a_row_past_the_model_positions_before_sampling(tmp_path, model, tokenizer, monkeypatch):
    rows = make_math_dataset("train", n=4, seed=0).to_list()
    rows[2]["privileged_context"] = "7" * 100_000  # no `max_teacher_prompt_length`: it cannot fit
    _never_sample(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="Row 2: its teacher prompt is .* max_position_embeddings=1024"):
        build_teacher_pool(
            copy.deepcopy(model), tokenizer, Dataset.from_list(rows), str(tmp_path / "p"), make_args(tmp_path), 4
        )
    assert time.perf_counter() - start < 10
    assert not list((tmp_path / "p" / "parts").glob("*.parquet"))


@pytest.mark.parametrize("context", INVISIBLE)
def test_pool_build_refuses_an_invisible_context_before_sampling(tmp_path, model, tokenizer, monkeypatch, context):
    rows = make_math_dataset("train", n=4, seed=0).to_list()
    rows[1]["privileged_context"] = context
    _never_sample(monkeypatch)
    with pytest.raises(ValueError, match="Row 1 has an empty privileged context"):
        build_teacher_pool(
            copy.deepcopy(model), tokenizer, Dataset.from_list(rows), str(tmp_path / "p"), make_args(tmp_path), 4
        )


# ---- one definition of an empty context, at construction and in streaming -----------------------------------------
def _stream(rows):
    def generate():
        yield from rows

    return IterableDataset.from_generator(generate)


@pytest.mark.parametrize("context", INVISIBLE)
def test_invisible_context_is_empty_at_construction_and_in_streaming(tmp_path, tokenizer, context):
    rows = make_math_dataset("train", n=6, seed=0).to_list()
    rows[2]["privileged_context"] = context
    with pytest.raises(ValueError, match="train_dataset: Row 2 has an empty privileged context"):
        PBSDTrainer(
            build_random_model(tokenizer),
            contains_answer,
            args=make_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    args = make_args(tmp_path, per_device_train_batch_size=12, shuffle_dataset=False)
    trainer = PBSDTrainer(
        build_random_model(tokenizer),
        contains_answer,
        args=args,
        train_dataset=_stream(rows),
        processing_class=tokenizer,
    )
    before = snapshot(trainer.model)
    with pytest.raises(ValueError, match="Row 2 has an empty privileged context"):
        trainer.train()
    assert trainer.state.global_step == 0 and unchanged(before, trainer.model)


def test_context_with_a_visible_character_among_invisible_ones_is_kept(tmp_path, tokenizer):
    rows = make_math_dataset("train", n=2, seed=0).to_list()
    rows[0]["privileged_context"] = "\u200b\x1b[1m7\x1b[0m"
    trainer = PBSDTrainer(
        build_random_model(tokenizer),
        contains_answer,
        args=make_args(tmp_path),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    assert trainer.teacher_prompts.contexts(rows) == [r["privileged_context"] for r in rows]


# ---- unencodable strings in streamed rows --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "column, value, fragment",
    [
        ("privileged_context", "12+30=\udc80", "Row 2: column 'privileged_context' holds '\\\\udc80' at character 6"),
        ("prompt", [{"role": "user", "content": "What is \ud800?"}], "Row 2: message 0 of column 'prompt' holds"),
    ],
)
def test_streamed_row_with_a_lone_surrogate_names_row_and_column(tmp_path, tokenizer, column, value, fragment):
    rows = make_math_dataset("train", n=6, seed=0).to_list()
    rows[2][column] = value
    args = make_args(tmp_path, per_device_train_batch_size=12, shuffle_dataset=False)
    trainer = PBSDTrainer(
        build_random_model(tokenizer),
        contains_answer,
        args=args,
        train_dataset=_stream(rows),
        processing_class=tokenizer,
    )
    before = snapshot(trainer.model)
    with pytest.raises(ValueError, match=fragment) as err:
        trainer.train()
    assert "no UTF-8 form" in str(err.value)
    assert trainer.state.global_step == 0 and unchanged(before, trainer.model)


# ---- rollout_func outputs -------------------------------------------------------------------------------------------
QUESTION, HINT = "What is 3 * 4?", "call multiply."


def agent_rows(n=4):
    return [{"prompt": [{"role": "user", "content": QUESTION}], "privileged_context": HINT}] * n


def agent_args(tmp_path, **kwargs):
    return tiny_pbsd_config(
        tmp_path,
        **{
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "max_completion_length": 16,
            "max_steps": 1,
            "teacher_prompt_template": "{prompt} Hint: {privileged_context}",
            **kwargs,
        },
    )


@pytest.fixture(scope="module")
def tool_setup():
    tokenizer = tool_tokenizer()
    return build_random_model(tokenizer, seed=0, max_position_embeddings=4096), tokenizer


def agent_trainer(tmp_path, tool_setup, reward_funcs=None, trainer_cls=ScriptedAnswerTrainer, args=None, **kwargs):
    model, tokenizer = copy.deepcopy(tool_setup[0]), tool_setup[1]
    return trainer_cls(
        model,
        reward_funcs,
        args=args or agent_args(tmp_path),
        train_dataset=Dataset.from_list(agent_rows(8)),
        processing_class=tokenizer,
        **kwargs,
    )


def scripted_rollout(tokenizer, rows_of=len):
    """A rollout of fixed completions; `rows_of(prompts)` is how many rows it returns."""

    def rollout(prompts, trainer):
        n = rows_of(prompts)
        template = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = [tokenizer.apply_chat_template(p, **template)["input_ids"] for p in prompts][:n]
        answer = tokenizer("12<|im_end|>")["input_ids"]
        return {"prompt_ids": [list(i) for i in ids], "completion_ids": [answer] * n, "logprobs": None}

    return rollout


def answered_12(completions, **kwargs):
    return [float("12" in str(c)) for c in completions]


def _is_teacher_call(prompts):
    return "Hint:" in prompts[0][-1]["content"]


@pytest.mark.parametrize(
    "make_rollout, error, fragment",
    [
        (lambda tok: lambda prompts, trainer: None, TypeError, "returned NoneType None; it must return a dict"),
        (lambda tok: scripted_rollout(tok, lambda p: len(p) - 1), ValueError, "returned 3 rows of 'prompt_ids' for 4"),
        (  # right on the student's call, one row short on the teacher's
            lambda tok: scripted_rollout(tok, lambda p: len(p) - _is_teacher_call(p)),
            ValueError,
            r"\(the teacher's call, on the teacher prompts\) returned 3 rows of 'prompt_ids' for 4",
        ),
    ],
)
def test_bad_rollout_func_output_names_the_rollout_func(tmp_path, tool_setup, make_rollout, error, fragment):
    rollout = make_rollout(tool_setup[1])
    rollout.__name__ = "my_rollout"
    args = agent_args(tmp_path, teacher_model_kind="live")
    trainer = agent_trainer(tmp_path, tool_setup, answered_12, PBSDTrainer, args, rollout_func=rollout)
    before = snapshot(trainer.model)
    with pytest.raises(error, match=fragment) as err:
        trainer.train()
    assert str(err.value).startswith("`rollout_func` 'my_rollout'") and "reward function" not in str(err.value)
    assert trainer.state.global_step == 0 and unchanged(before, trainer.model)


def test_a_correct_rollout_func_still_trains(tmp_path, tool_setup):
    args = agent_args(tmp_path, teacher_model_kind="live")
    rollout = scripted_rollout(tool_setup[1])
    trainer = agent_trainer(tmp_path, tool_setup, answered_12, PBSDTrainer, args, rollout_func=rollout)
    trainer.train()
    assert trainer.state.global_step == 1


# ---- tool-call timeout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1.0, float("inf")])
def test_tool_call_timeout_must_be_a_positive_number(tmp_path, value):
    with pytest.raises(ValueError, match="`tool_call_timeout`"):
        tiny_pbsd_config(tmp_path, tool_call_timeout=value)


@pytest.fixture
def stuck_tools():
    """A sync and an async tool that block for a minute, released at teardown so that no thread outlives the test."""
    import asyncio

    release = threading.Event()

    def multiply(a: int, b: int) -> int:
        """
        Multiplies two integers.

        Args:
            a: The first integer.
            b: The second integer.

        Returns:
            The product of the two integers.
        """
        release.wait(60)
        return a * b

    async def add(a: int, b: int) -> int:
        """
        Adds two integers.

        Args:
            a: The first integer.
            b: The second integer.

        Returns:
            The sum of the two integers.
        """
        await asyncio.sleep(60)
        return a + b

    yield multiply, add
    release.set()


@pytest.mark.parametrize("name", ["multiply", "add"])
def test_a_tool_that_never_returns_goes_back_to_the_model_as_a_tool_error(tmp_path, tool_setup, stuck_tools, name):
    """GRPO's tool loop on a completion that calls the tool: past the timeout the model reads a tool error."""
    args = agent_args(tmp_path, tool_call_timeout=0.5, max_tool_calling_iterations=1, max_completion_length=256)
    trainer = agent_trainer(tmp_path, tool_setup, answered_12, args=args, tools=list(stuck_tools))
    tokenizer = tool_setup[1]
    prompts = [[{"role": "user", "content": QUESTION}]]
    template = dict(tools=list(stuck_tools), add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt_ids = [tokenizer.apply_chat_template(prompts[0], **template)["input_ids"]]
    call = {"type": "function", "function": {"name": name, "arguments": {"a": 3, "b": 4}}}
    completions = [[{"role": "assistant", "content": "", "tool_calls": [call]}]]
    trainer._sync_tool_dicts, trainer._async_tool_dicts = [{"multiply": stuck_tools[0]}], [{"add": stuck_tools[1]}]
    grpo_dicts = trainer._sync_tool_dicts, trainer._async_tool_dicts
    start = time.perf_counter()
    _, completions, _, _, calls, failures, _ = trainer._tool_call_loop(
        prompts, prompt_ids, [[tokenizer.eos_token_id]], completions, None, None, {}
    )
    assert time.perf_counter() - start < 20  # the tools block for 60 s
    assert calls == 1 and failures == 1
    message = completions[0][1]
    assert message["role"] == "tool" and message["name"] == name
    assert f"tool '{name}' did not return within tool_call_timeout=0.5 s" in message["content"]
    assert completions[0][2]["role"] == "assistant"  # the model went on after the tool error
    assert (trainer._sync_tool_dicts, trainer._async_tool_dicts) == grpo_dicts  # GRPO's own dicts are untouched


class ToolCallingTrainer(ScriptedAnswerTrainer):
    """Every first turn calls `multiply(3, 4)`; a turn after a tool result answers `12`."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        tok = self._tokenizer
        call = tok('<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>')
        answer = tok("12<|im_end|>")["input_ids"]
        after_tool = tok.convert_tokens_to_ids("</tool_response>")
        return [list(answer if after_tool in ids else call["input_ids"]) for ids in prompt_ids], None


def test_training_with_a_tool_that_never_returns_goes_on(tmp_path, tool_setup, stuck_tools):
    args = agent_args(tmp_path, tool_call_timeout=0.2, max_tool_calling_iterations=2, max_completion_length=256)
    trainer = agent_trainer(tmp_path, tool_setup, answered_12, ToolCallingTrainer, args, tools=[stuck_tools[0]])
    start = time.perf_counter()
    trainer.train()
    assert time.perf_counter() - start < 40  # 8 episodes of one call each; the tool blocks for 60 s
    (log,) = [entry for entry in trainer.state.log_history if "tools/call_frequency" in entry]
    assert log["tools/call_frequency"] == 1.0 and log["tools/failure_frequency"] == 1.0
    assert log["pbsd/teacher_tools/failure_frequency"] == 1.0


def test_a_timed_tool_passes_results_and_errors_through():
    from pbsd_trl.agent import _timed_tool

    def broken(a: int, b: int) -> int:
        raise ArithmeticError("no")

    assert _timed_tool(multiply, "multiply", 5.0)(a=3, b=4) == 12
    with pytest.raises(ArithmeticError, match="no"):
        _timed_tool(broken, "broken", 5.0)(a=3, b=4)


# ---- environments: reward labels from get_reward, a failing get_reward -------------------------------------------
class ContextLengthEnv:
    """Rewards an episode by the length of its row's context: a deterministic reward source of its own."""

    def reset(self, **kwargs):
        self.reward = float(len(kwargs["privileged_context"]))

    def multiply(self, a: int, b: int) -> int:
        """
        Multiplies two integers.

        Args:
            a: The first integer.
            b: The second integer.

        Returns:
            The product of the two integers.
        """
        return a * b

    def get_reward(self) -> float:
        return self.reward


class ExplodingEnv(ContextLengthEnv):
    def get_reward(self) -> float:
        raise ZeroDivisionError("the judge is down")


def test_reward_labels_from_an_environment_reward_alone_train(tmp_path, tool_setup):
    args = agent_args(tmp_path, pair_labels="reward")
    trainer = agent_trainer(tmp_path, tool_setup, args=args, environment_factory=ContextLengthEnv)
    assert trainer.reward_func_names == ["ContextLengthEnv"]
    trainer.train()
    assert trainer.state.global_step == 1
    # the last reward call is the teacher's: its episodes were scored by their environments
    assert trainer._last_rewards_per_func.flatten().tolist() == [float(len(HINT))] * 4


def test_reward_labels_without_any_reward_source_are_still_refused(tmp_path, tool_setup):
    plain = type("PlainEnv", (), {"reset": lambda self, **kwargs: None})
    with pytest.raises(ValueError, match="pair_labels='reward'.*pass at least one reward function"):
        agent_trainer(tmp_path, tool_setup, args=agent_args(tmp_path, pair_labels="reward"), environment_factory=plain)


def test_failing_environment_reward_names_the_environment(tmp_path, tool_setup):
    trainer = agent_trainer(tmp_path, tool_setup, environment_factory=ExplodingEnv)
    before = snapshot(trainer.model)
    with pytest.raises(RuntimeError, match="reward function 'ExplodingEnv.get_reward' raised ZeroDivisionError"):
        trainer.train()
    assert trainer.state.global_step == 0 and unchanged(before, trainer.model)


@pytest.mark.slow
@pytest.mark.distributed
def test_environment_reward_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    """Rank 1's environment reward raises: both ranks raise the same named error, promptly, before any update."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
    from launch import accelerate_launch, failure_report

    rc, output, _ = accelerate_launch(
        "examples/accelerate_configs/multi_gpu.yaml", "run_env_reward_failure.py", "--out", str(tmp_path), timeout=300
    )
    assert rc == 0, failure_report(output)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["type"] == "RuntimeError", report
        assert "reward function 'RankOneExplodingEnv.get_reward' raised ZeroDivisionError" in report["message"]
        assert "on process 1 of 2" in report["message"], report
        assert report["params_unchanged"] and report["global_step"] == 0, report
    assert reports[0]["message"] == reports[1]["message"]
    assert max(r["seconds_to_error"] for r in reports) < 120, reports
