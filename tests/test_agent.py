"""Agent training with PBSD: teacher samples through GRPO's own tool/environment loop, tool results never scored.

The tiny model is made to call the tool by a short supervised warm start on one scripted episode (call
`multiply(3, 4)`, read the result, answer `12`), from both the student and the teacher prompt. Everything after that —
generation, tool execution, the second turn, masks and scores — is the trainer's own code path.

Then hostile input to the agent features (`pbsd_trl/agent.py`), each named before any update or handled: a bad
`rollout_func` output, a tool that never returns (`tool_call_timeout`), an environment's reward as the only reward
source and one that raises (also on one of two processes). These use a random model of the same tool-calling
tokenizer (the rollouts are scripted or the tool is called by hand).
"""

import copy
import json
import os
import sys
import threading
import time

import pytest
import torch
from datasets import Dataset
from testing_utils import (
    ScriptedAnswerTrainer,
    manual_sequence_logps,
    multiply,
    params_snapshot,
    params_unchanged,
    tiny_pbsd_config,
    tool_tokenizer,
)

from pbsd_trl import PBSDTrainer
from pbsd_trl.recipes.tiny import build_random_model


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = "{prompt} Hint: {privileged_context}"
QUESTION = "What is 3 * 4?"
HINT = "call multiply."
TOOL_CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'


def episode_ids(tokenizer, user_content):
    """Prompt ids (tools rendered) and the scripted episode after it: tool call, tool result, final answer."""
    prompt = [{"role": "user", "content": user_content}]
    prompt_ids = tokenizer.apply_chat_template(
        prompt, tools=[multiply], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}
    conversation = prompt + [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "multiply", "content": "12"},
        {"role": "assistant", "content": "12"},
    ]
    full = tokenizer.apply_chat_template(conversation, tools=[multiply], tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    return prompt_ids, full[len(prompt_ids) :]


@pytest.fixture(scope="module")
def tool_model():
    tokenizer = tool_tokenizer()
    model = build_random_model(
        tokenizer,
        seed=0,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    rows = [
        episode_ids(tokenizer, content)
        for content in (QUESTION, TEMPLATE.format(prompt=QUESTION, privileged_context=HINT))
    ]
    width = max(len(p) + len(e) for p, e in rows)
    ids = torch.full((2, width), tokenizer.pad_token_id)
    labels = torch.full((2, width), -100)
    attention = torch.zeros(2, width, dtype=torch.long)
    for i, (prompt_ids, episode) in enumerate(rows):
        n = len(prompt_ids) + len(episode)
        ids[i, :n] = torch.tensor(prompt_ids + episode)
        labels[i, len(prompt_ids) : n] = torch.tensor(episode)
        # The tool result is the environment's text, not the model's: not learned, so scoring it would show
        call, answer = len(tokenizer(TOOL_CALL)["input_ids"]), len(tokenizer("12<|im_end|>\n")["input_ids"])
        labels[i, len(prompt_ids) + call : n - answer] = -100
        attention[i, :n] = 1
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.03  # the episode is memorized: the model calls the tool from either prompt
    model.eval()
    return model, tokenizer


def dataset(n=8):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": QUESTION}], "privileged_context": HINT}] * n)


def make_args(tmp_path, **kwargs):
    return tiny_pbsd_config(
        tmp_path,
        **{
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "max_completion_length": 128,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "teacher_prompt_template": TEMPLATE,
            "max_tool_calling_iterations": 2,
            "temperature": 0.5,  # sharper sampling: a malformed call (one wrong character of JSON) is not executed
            **kwargs,
        },
    )


def agent_sequence_logps(model, prompt_ids, prompt_mask, completion_ids, attention, scored, temperature=0.5):
    """The reference scoring at these tests' sampling temperature, over `scored` tokens only (tool results attended to,
    not scored), without gradient."""
    with torch.no_grad():
        return manual_sequence_logps(model, prompt_ids, prompt_mask, completion_ids, attention, temperature, scored)


def answered_12(completions, **kwargs):
    return [float(c[-1].get("content", "").strip() == "12") for c in completions]


def test_teacher_samples_call_the_tool_through_grpos_loop_and_tool_results_are_not_scored(tmp_path, tool_model):
    model, tokenizer = copy.deepcopy(tool_model[0]), tool_model[1]
    trainer = PBSDTrainer(
        model,
        answered_12,
        args=make_args(tmp_path, teacher_model_kind="live"),
        train_dataset=dataset(),
        processing_class=tokenizer,
        tools=[multiply],
    )
    trainer.model.eval()  # deterministic scoring for the comparison below; generation samples either way
    rows = [dict(r) for r in dataset(4)]
    inputs = trainer._generate_and_score_completions(rows)

    assert "teacher_tool_mask" in inputs and "tool_mask" in inputs
    teacher_scored = inputs["teacher_completion_mask"] * inputs["teacher_tool_mask"]
    called = 0
    for i in range(len(rows)):
        prompt = tokenizer.decode(inputs["teacher_prompt_ids"][i][inputs["teacher_prompt_mask"][i].bool()])
        assert HINT in prompt and '"name": "multiply"' in prompt  # teacher prompt: privileged hint and tool schema
        completion = inputs["teacher_completion_ids"][i][inputs["teacher_completion_mask"][i].bool()]
        tool_tokens = completion[(inputs["teacher_tool_mask"][i][: len(completion)] == 0)]
        if "<tool_response>" in tokenizer.decode(completion):  # a well-formed call, which the loop executed
            called += 1
            # the masked-out tokens are exactly the tool result the loop appended, and it holds 3 * 4
            assert "<tool_response>\n12\n</tool_response>" in tokenizer.decode(tool_tokens)
            assert tokenizer.decode(completion).endswith("12<|im_end|>")
    assert called >= 2  # the warm-started teacher calls the tool in most episodes

    # Teacher log-probs (live teacher: the current weights, from the teacher prompt) skip the tool-result tokens,
    # for the teacher's samples and for the student's (which also called the tool)
    for key, ids, attention, scored in [
        ("teacher_logps_teacher_samples", "teacher_completion_ids", "teacher_completion_mask", teacher_scored),
        (
            "teacher_logps_student_samples",
            "completion_ids",
            "completion_mask",
            inputs["completion_mask"] * inputs["tool_mask"],
        ),
    ]:
        expected = agent_sequence_logps(
            model, inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"], inputs[ids], inputs[attention], scored
        )
        unmasked = agent_sequence_logps(
            model,
            inputs["teacher_prompt_ids"],
            inputs["teacher_prompt_mask"],
            inputs[ids],
            inputs[attention],
            inputs[attention],
        )
        torch.testing.assert_close(inputs[key].double(), expected, atol=1e-4, rtol=1e-4)
        assert (expected - unmasked).abs().max() > 1.0  # scoring the tool results would change the numbers

    # The loss: the student's log-probs from the student prompt, over the same masks
    loss = trainer.compute_loss(trainer.model, inputs)
    student_on_teacher = agent_sequence_logps(
        model,
        inputs["prompt_ids"],
        inputs["prompt_mask"],
        inputs["teacher_completion_ids"],
        inputs["teacher_completion_mask"],
        teacher_scored,
    )
    student_on_student = agent_sequence_logps(
        model,
        inputs["prompt_ids"],
        inputs["prompt_mask"],
        inputs["completion_ids"],
        inputs["completion_mask"],
        inputs["completion_mask"] * inputs["tool_mask"],
    )
    margins = trainer.args.pbsd_beta * (
        (student_on_teacher - inputs["teacher_logps_teacher_samples"].double())
        - (student_on_student - inputs["teacher_logps_student_samples"].double())
    )
    torch.testing.assert_close(loss.double(), -torch.nn.functional.logsigmoid(margins).mean(), atol=1e-5, rtol=1e-5)


def test_pbsd_with_tools_trains_two_steps_and_logs_teacher_tool_calls(tmp_path, tool_model):
    model, tokenizer = copy.deepcopy(tool_model[0]), tool_model[1]
    trainer = PBSDTrainer(
        model,
        answered_12,
        args=make_args(tmp_path),
        train_dataset=dataset(),
        processing_class=tokenizer,
        tools=[multiply],
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "pbsd/teacher_tools/call_frequency" in log]
    assert len(logs) == 2
    # most teacher episodes called the tool, and the student's tool metrics stay the student's
    assert all(log["pbsd/teacher_tools/call_frequency"] >= 0.5 for log in logs)
    assert all("tools/call_frequency" in log for log in logs)
    assert all(log["pbsd/teacher_reward"] >= 0.5 for log in logs)  # the teacher's episodes end with the right answer


class MultiplyEnv:
    """Toy environment: counts the calls of its tool; rewards an episode that used it."""

    def __init__(self):
        self.calls = 0

    def reset(self, **kwargs):
        self.calls = 0

    def multiply(self, a: int, b: int) -> int:
        """
        Multiplies two integers.

        Args:
            a: The first integer.
            b: The second integer.

        Returns:
            The product of the two integers.
        """
        self.calls += 1
        return a * b

    def get_reward(self) -> float:
        return float(self.calls > 0)


def test_environment_factory_teacher_episodes_use_their_own_reset_environments(tmp_path, tool_model):
    model, tokenizer = copy.deepcopy(tool_model[0]), tool_model[1]
    # No reward_funcs: the environment's own get_reward is the reward source, read after each episode set
    trainer = PBSDTrainer(
        model,
        args=make_args(tmp_path),
        train_dataset=dataset(),
        processing_class=tokenizer,
        environment_factory=MultiplyEnv,
    )
    assert trainer.reward_func_names == ["MultiplyEnv"]
    trainer.train()
    logs = [log for log in trainer.state.log_history if "pbsd/teacher_reward" in log]
    assert len(logs) == 2
    # get_reward read each teacher episode's environment: it called the tool there
    assert all(log["pbsd/teacher_reward"] >= 0.5 for log in logs)
    assert all(log["pbsd/teacher_tools/call_frequency"] >= 0.5 for log in logs)


class RandomObservationEnv(MultiplyEnv):
    def __init__(self):
        super().__init__()
        self.resets = 0

    def reset(self, **kwargs):
        self.resets += 1
        return f" (episode {self.resets})"


def test_environment_whose_reset_differs_between_episodes_is_refused(tmp_path, tool_model):
    model, tokenizer = copy.deepcopy(tool_model[0]), tool_model[1]
    trainer = PBSDTrainer(
        model,
        args=make_args(tmp_path),
        train_dataset=dataset(),
        processing_class=tokenizer,
        environment_factory=RandomObservationEnv,
    )
    with pytest.raises(ValueError, match=r"row 0 returned a different observation from `reset\(\)`"):
        trainer._generate_and_score_completions([dict(r) for r in dataset(4)])


def test_rollout_func_needs_a_teacher_rollout_per_row(tmp_path, tool_model):
    model, tokenizer = copy.deepcopy(tool_model[0]), tool_model[1]

    def rollout(prompts, trainer):
        raise AssertionError("not reached")

    args = make_args(tmp_path, pairing="all", num_teacher_generations=1)
    with pytest.raises(ValueError, match="With `rollout_func`, every row needs a teacher rollout"):
        PBSDTrainer(
            model, answered_12, args=args, train_dataset=dataset(), processing_class=tokenizer, rollout_func=rollout
        )


def test_rollout_func_serves_the_teacher_from_the_teacher_prompt_with_its_env_mask(tmp_path, tool_model):
    model, tokenizer = copy.deepcopy(tool_model[0]), tool_model[1]
    seen = []

    def scripted_rollout(prompts, trainer):
        # A rollout that runs its own episode: its own tokenization, the scripted episode, the tool result masked
        seen.append([p[-1]["content"] for p in prompts])
        prompt_ids, completion_ids, env_mask = [], [], []
        for prompt in prompts:
            ids, episode = episode_ids(tokenizer, prompt[-1]["content"])
            call, answer = len(tokenizer(TOOL_CALL)["input_ids"]), len(tokenizer("12<|im_end|>\n")["input_ids"])
            prompt_ids.append(ids)
            completion_ids.append(episode)
            env_mask.append([1] * call + [0] * (len(episode) - call - answer) + [1] * answer)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None, "env_mask": env_mask}

    trainer = PBSDTrainer(
        model,
        answered_12,
        args=make_args(tmp_path, teacher_model_kind="live"),
        train_dataset=dataset(),
        processing_class=tokenizer,
        rollout_func=scripted_rollout,
    )
    trainer.model.eval()
    inputs = trainer._generate_and_score_completions([dict(r) for r in dataset(4)])
    student_call, teacher_call = seen
    assert all(HINT not in c for c in student_call) and all(HINT in c for c in teacher_call)
    expected_prompt, _ = episode_ids(tokenizer, TEMPLATE.format(prompt=QUESTION, privileged_context=HINT))
    prompt = inputs["teacher_prompt_ids"][0][inputs["teacher_prompt_mask"][0].bool()].tolist()
    assert prompt == expected_prompt  # the rollout's own tokens of the teacher prompt
    assert (inputs["teacher_tool_mask"] == 0).any() and (inputs["tool_mask"] == 0).any()
    teacher_scored = inputs["teacher_completion_mask"] * inputs["teacher_tool_mask"]
    expected = agent_sequence_logps(
        model,
        inputs["teacher_prompt_ids"],
        inputs["teacher_prompt_mask"],
        inputs["teacher_completion_ids"],
        inputs["teacher_completion_mask"],
        teacher_scored,
    )
    torch.testing.assert_close(inputs["teacher_logps_teacher_samples"].double(), expected, atol=1e-4, rtol=1e-4)


# ---- rollout_func outputs -------------------------------------------------------------------------------------------
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


def mentions_12(completions, **kwargs):
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
    trainer = agent_trainer(tmp_path, tool_setup, mentions_12, PBSDTrainer, args, rollout_func=rollout)
    before = params_snapshot(trainer.model)
    with pytest.raises(error, match=fragment) as err:
        trainer.train()
    assert str(err.value).startswith("`rollout_func` 'my_rollout'") and "reward function" not in str(err.value)
    assert trainer.state.global_step == 0 and params_unchanged(before, trainer.model)


def test_a_correct_rollout_func_still_trains(tmp_path, tool_setup):
    args = agent_args(tmp_path, teacher_model_kind="live")
    rollout = scripted_rollout(tool_setup[1])
    trainer = agent_trainer(tmp_path, tool_setup, mentions_12, PBSDTrainer, args, rollout_func=rollout)
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
    trainer = agent_trainer(tmp_path, tool_setup, mentions_12, args=args, tools=list(stuck_tools))
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
    trainer = agent_trainer(tmp_path, tool_setup, mentions_12, ToolCallingTrainer, args, tools=[stuck_tools[0]])
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
    before = params_snapshot(trainer.model)
    with pytest.raises(RuntimeError, match="reward function 'ExplodingEnv.get_reward' raised ZeroDivisionError"):
        trainer.train()
    assert trainer.state.global_step == 0 and params_unchanged(before, trainer.model)


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
