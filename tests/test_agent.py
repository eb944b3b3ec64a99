"""Agent training with PBSD: teacher samples through GRPO's own tool/environment loop, tool results never scored.

The tiny model is made to call the tool by a short supervised warm start on one scripted episode (call
`multiply(3, 4)`, read the result, answer `12`), from both the student and the teacher prompt. Everything after that —
generation, tool execution, the second turn, masks and scores — is the trainer's own code path.
"""

import copy

import pytest
import torch
from datasets import Dataset
from testing_utils import manual_sequence_logps, multiply, tiny_pbsd_config, tool_tokenizer

from pbsd_trl import PBSDTrainer
from pbsd_trl.recipes.tiny import build_random_model


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
