"""Reward functions and their checks (`pbsd_trl/rewards/`): the math and tool-call rewards against tables of cases,
their time limits, naming and combining; what a reward function returns or raises is checked and named
(`validation.py`), and a reward function failing on one of two processes fails on both, named (`guard.py`).
"""

import asyncio
import functools
import json
import os
import pickle
import sys
import threading
import time

import pytest

from pbsd_trl.rewards import (
    MathAccuracyReward,
    RewardFunction,
    ToolCallReward,
    call_reward_safely,
    check_reward_outputs,
    combine_rewards,
    completion_text,
    ensure_sync,
    extract_boxed,
    extract_final_answer,
    get_reward_func_name,
    is_async_reward_func,
    math_accuracy_reward,
    normalize_answer,
    parse_tool_calls,
    tool_call_reward,
    validate_reward_funcs,
    weighted_reward_sum,
)
from pbsd_trl.rewards.verifier import get_worker as _get_worker


pytest.importorskip("math_verify")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF, NAN = float("inf"), float("nan")
GARBAGE = "".join(chr(33 + (i * 7919) % 90) for i in range(10_000)).replace("#", "").replace("\\", "")

# (completion, reference answer, expected reward)
MATH_CASES = [
    # equivalent forms of one half
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
    (r"\boxed{\frac12}", "0.5", 1.0),
    (r"\boxed{\frac{2}{4}}", "1/2", 1.0),
    (r"\boxed{.5}", "1/2", 1.0),
    (r"\boxed{\left(\frac{1}{2}\right)}", "0.5", 1.0),
    (r"\boxed{0.6}", "1/2", 0.0),
    (r"\boxed{0.5}", r"$\frac{1}{2}$", 1.0),  # `$` delimiters in the reference
    # nested braces and symbolic equivalence
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}", 0.0),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{\pi}", r"\pi", 1.0),
    (r"\boxed{3.14}", r"\pi", 0.0),
    (r"\boxed{\{2,1\}}", r"\{1,2\}", 1.0),
    (r"\boxed{0.333333}", r"\frac{1}{3}", 1.0),  # math-verify's 6-decimal rounding
    # multiple boxes: the last one wins
    (r"First \boxed{3}, then \boxed{4}", "4", 1.0),
    (r"First \boxed{3}, then \boxed{4}", "3", 0.0),
    (r"\boxed{2} is wrong; it is \boxed{\frac{1}{3}}", r"\frac{1}{3}", 1.0),
    (r"#### 5 but really \boxed{6}", "6", 1.0),  # \boxed takes priority over ####
    (r"\fbox{12}", "12", 1.0),
    # GSM8K-style answers
    ("So she has 72 clips.\n#### 72", "72", 1.0),
    ("#### 72 apples.", "72", 1.0),
    ("#### 71", "72", 0.0),
    ("#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 1.0),  # reference is a full solution
    ("#### 72", 72, 1.0),  # numeric column
    # negative numbers and signs
    ("#### -5", "-5", 1.0),
    (r"\boxed{-5}", "-5", 1.0),
    (r"\boxed{-5}", "5", 0.0),
    (r"\boxed{-0}", "0", 1.0),
    (r"\boxed{+3}", "3", 1.0),
    # thousands separators, trailing zeros, units, dollars
    (r"\boxed{1,000}", "1000", 1.0),
    ("#### 1,000,000", "1000000", 1.0),
    (r"\boxed{1000}", "1,000", 1.0),
    (r"\boxed{1{,}000}", "1000", 1.0),
    (r"\boxed{5.0}", "5", 1.0),
    (r"\boxed{5.00}", "5", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{\$72}", "72", 1.0),
    (r"The total is $\boxed{72}$.", "72", 1.0),
    (r"\boxed{100000000000000000001}", "100000000000000000000", 0.0),  # exact, no float rounding
    # malformed outputs score 0.0
    ("", "5", 0.0),
    ("The answer is 5", "5", 0.0),  # no final-answer marker
    (GARBAGE, "5", 0.0),
    (r"\boxed{" + GARBAGE, "5", 0.0),  # 10k characters, never closed
    (r"\boxed{\frac{1}{2}", "0.5", 0.0),  # truncated: unbalanced braces
    (r"\boxed{5}}", "5", 1.0),  # a stray closing brace after a complete box is harmless
    (r"\boxed{}", "5", 0.0),
    (r"\boxed{3/0}", "3", 0.0),
    (r"\boxed{\frac{1}{}}", "1", 0.0),
    (r"\boxed{)(*&^%}", "5", 0.0),
    ("#### ", "5", 0.0),
]


@pytest.fixture(scope="module")
def math_reward():
    reward = MathAccuracyReward(timeout_seconds=5.0)
    reward.verify_answer("x+1", "1+x")  # start the verification worker once for the module
    return reward


class TestMathAccuracy:
    @pytest.mark.parametrize(("completion", "answer", "expected"), MATH_CASES)
    def test_table(self, math_reward, completion, answer, expected):
        assert math_reward(prompts=["q"], completions=[completion], answer=[answer]) == [expected]

    def test_table_in_process_agrees(self, math_reward):
        # The in-process fallback must give the same verdicts as the worker.
        in_process = MathAccuracyReward(use_subprocess=False)
        completions, answers, expected = zip(*MATH_CASES, strict=True)
        assert in_process(prompts=None, completions=list(completions), answer=list(answers)) == list(expected)

    def test_conversational_completions(self, math_reward):
        completions = [
            [{"role": "assistant", "content": r"\boxed{7}"}],
            [{"role": "assistant", "content": r"\boxed{8}"}],
            # tool output is not model output: its \boxed{9} must be ignored
            [{"role": "assistant", "content": r"\boxed{7}"}, {"role": "tool", "content": r"\boxed{9}"}],
            [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{7}"}]}],
        ]
        assert math_reward(
            prompts=[[{"role": "user", "content": "q"}]] * 4, completions=completions, answer=["7"] * 4
        ) == [
            1.0,
            0.0,
            1.0,
            1.0,
        ]

    def test_plain_function_and_solution_column(self):
        solution = r"We compute $3/4$, so the answer is $\boxed{\frac{3}{4}}$."
        completions = [
            [{"role": "assistant", "content": r"\boxed{0.75}"}],
            [{"role": "assistant", "content": "#### 1"}],
        ]
        assert math_accuracy_reward(prompts=["q", "q"], completions=completions, solution=[solution] * 2) == [1.0, 0.0]
        # a solution without a marker is parsed as free text, as in TRL's accuracy_reward
        assert math_accuracy_reward(completions=[r"\boxed{0.5}"], solution=[r"It is $\frac{1}{2}$"]) == [1.0]

    def test_missing_reference(self, math_reward):
        assert math_reward(prompts=["q", "q"], completions=["#### 1", "#### 1"], answer=[None, ""]) == [None, None]
        with pytest.raises(KeyError, match="'answer' or 'solution'"):
            math_reward(prompts=["q"], completions=["#### 1"], label=["1"])

    def test_pattern_and_first_occurrence(self):
        reward = MathAccuracyReward(pattern=r"ANSWER:\s*(\S+)")
        assert reward(
            prompts=None,
            completions=["ANSWER: 1/2", r"\boxed{0.5}", "ANSWER: 3 ANSWER: 4"],
            answer=["0.5", "0.5", "4"],
        ) == [1.0, 0.0, 1.0]
        first = MathAccuracyReward(which="first")
        # the tiny task's convention: the first `#### N` counts, whatever the model rambles afterwards
        assert first(prompts=None, completions=["7+9=16>6;#### 936 #### 12"], answer=["936"]) == [1.0]

    def test_extraction_helpers(self):
        assert extract_boxed(r"a \boxed{\frac{\sqrt{2}}{2}} b") == r"\frac{\sqrt{2}}{2}"
        assert extract_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces are not group delimiters
        assert extract_boxed(r"\boxed{1} \boxed{2", which="first") == "1"
        assert extract_boxed(r"\boxed{1} \boxed{2") is None
        assert extract_final_answer("#### $1,234.") == "1,234"
        assert normalize_answer(r"\$ 1,234.50 ") == "1234.5"
        assert normalize_answer(r"\left( x \right)") == "(x)"

    def test_reward_is_picklable(self, math_reward):
        # TRL's async rollout worker sends reward functions to a spawned process.
        clone = pickle.loads(pickle.dumps(math_reward))
        assert clone(prompts=None, completions=["#### 3"], answer=["3"]) == [1.0]
        assert pickle.loads(pickle.dumps(math_accuracy_reward)) is math_accuracy_reward


# An expression that keeps math-verify busy for minutes: the verifier evaluates the power tower.
SLOW = r"\boxed{9^{9^{9}}}"
LIMIT = 1.0
SLACK = 0.5


class TestTimeLimit:
    def _timed(self, reward, completions, answers):
        _get_worker().verify("1", "1", True, 30.0, None)  # make sure a worker is up: startup is not part of the limit
        start = time.monotonic()
        rewards = reward(prompts=None, completions=completions, answer=answers)
        return rewards, time.monotonic() - start

    def test_soft_limit_interrupts_without_killing(self):
        worker = _get_worker()
        restarts = worker.stats["restarts"]
        rewards, elapsed = self._timed(MathAccuracyReward(timeout_seconds=LIMIT), [SLOW], ["5"])
        assert rewards == [0.0]
        assert elapsed < LIMIT + SLACK
        assert worker.stats["restarts"] == restarts  # interrupted inside the worker, which keeps running

    def test_hard_limit_kills_the_worker(self):
        # Without the worker's own timer, nothing stops math-verify: this also shows the expression really is slow
        # (a normal verification takes milliseconds), and that the parent's deadline holds regardless.
        worker = _get_worker()
        restarts = worker.stats["restarts"]
        reward = MathAccuracyReward(timeout_seconds=LIMIT, soft_timeout_fraction=None)
        rewards, elapsed = self._timed(reward, [SLOW], ["5"])
        assert rewards == [0.0]
        assert elapsed < LIMIT + SLACK
        assert worker.stats["restarts"] == restarts + 1
        # the replacement worker serves the next completion
        assert reward(prompts=None, completions=[r"\boxed{\frac{2}{\sqrt{2}}}"], answer=[r"\sqrt{2}"]) == [1.0]

    def test_limit_holds_off_the_main_thread(self):
        reward = MathAccuracyReward(timeout_seconds=LIMIT, soft_timeout_fraction=None)
        result = {}

        def run():
            result["value"] = self._timed(reward, [SLOW, r"\boxed{\sqrt{4}}"], ["5", "2"])

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=30)
        rewards, elapsed = result["value"]
        assert rewards == [0.0, 1.0]
        assert elapsed < LIMIT + SLACK + 2.0  # the second completion may wait for the replacement worker's imports

    def test_in_process_limit_on_main_thread(self):
        reward = MathAccuracyReward(timeout_seconds=LIMIT, use_subprocess=False)
        start = time.monotonic()
        assert reward(prompts=None, completions=[SLOW], answer=["5"]) == [0.0]
        assert time.monotonic() - start < LIMIT + SLACK

    def test_worker_exits_when_orphaned(self, tmp_path):
        # A trainer killed in the middle of a slow verification must not leave a worker computing forever.
        import os
        import subprocess
        import sys

        import pbsd_trl.rewards.verifier as verifier_module

        rewards_dir = os.path.dirname(verifier_module.__file__)
        script = (
            "import sys, types\n"
            "for name, path in [('pbsd_trl', sys.argv[1]), ('pbsd_trl.rewards', sys.argv[2])]:\n"
            "    m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m\n"
            "from pbsd_trl.rewards.verifier import get_worker as _get_worker\n"
            "w = _get_worker(); w.verify('1', '1', True, 60, None)\n"
            "print(w._proc.pid, flush=True)\n"
            f"w.verify({SLOW!r}, '5', True, 600, None)\n"
        )
        parent = subprocess.Popen(
            [sys.executable, "-c", script, os.path.dirname(rewards_dir), rewards_dir], stdout=subprocess.PIPE
        )
        worker_pid = int(parent.stdout.readline())
        time.sleep(0.5)  # let the worker get into the slow computation
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(worker_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(worker_pid, 9)
            pytest.fail("the verification worker outlived its parent")

    def test_timeouts_are_logged(self):
        logged = {}
        reward = MathAccuracyReward(timeout_seconds=LIMIT)
        reward(prompts=None, completions=[SLOW, "#### 1"], answer=["5", "1"], log_metric=logged.__setitem__)
        assert logged == {"math_accuracy_reward/verifier_timeouts": 1}


def _react(*calls):
    return "\n".join(f"Thought: step\nAction: {name}\nAction Input: {args}" for name, args in calls)


WEATHER = ("getWeather", '{"city": "Paris"}')
GOLD_WEATHER = [{"Action": "getWeather", "Action_Input": '{"city": "Paris"}'}]
GOLD_TWO = [
    {"Action": "getWeather", "Action_Input": '{"city": "Paris"}'},
    {"Action": "getTime", "Action_Input": {"zone": "CET"}},
]

# (completion, golden_answer, exact reward, partial-credit reward)
TOOL_CASES = [
    (_react(WEATHER), GOLD_WEATHER, 1.0, 1.0),
    (_react(WEATHER) + "\nObservation: sunny\nFinal Answer: It is sunny.", GOLD_WEATHER, 1.0, 1.0),
    (_react(("getForecast", '{"city": "Paris"}')), GOLD_WEATHER, 0.0, 0.0),  # wrong tool
    (_react(("getWeather", '{"city": "Lyon"}')), GOLD_WEATHER, 0.0, 0.0),  # wrong argument value
    (_react(("getWeather", '{"town": "Paris"}')), GOLD_WEATHER, 0.0, 0.0),  # wrong argument name
    (_react(("getWeather", '{"city": "Paris", "unit": "C"}')), GOLD_WEATHER, 0.0, 0.0),  # extra argument
    (_react(WEATHER, ("getTime", '{"zone": "CET"}')), GOLD_WEATHER, 0.0, 2 / 3),  # extra call
    (_react(WEATHER, WEATHER), GOLD_WEATHER, 0.0, 2 / 3),  # duplicated call: multisets differ
    (_react(WEATHER, ("getTime", '{"zone": "CET"}')), GOLD_TWO, 1.0, 1.0),
    (_react(("getTime", '{"zone": "CET"}'), WEATHER), GOLD_TWO, 1.0, 1.0),  # reordered calls
    (_react(WEATHER), GOLD_TWO, 0.0, 2 / 3),  # missing call
    (_react(WEATHER, ("getTime", '{"zone": "UTC"}')), GOLD_TWO, 0.0, 0.5),  # one of two calls right
    # SDFT merges the arguments of all calls: swapping them between calls still matches
    (_react(("getWeather", '{"zone": "CET"}'), ("getTime", '{"city": "Paris"}')), GOLD_TWO, 1.0, 1.0),
    (_react(("getWeather", '{"city": "Paris"')), GOLD_WEATHER, 0.0, 0.0),  # malformed JSON
    (_react(("getWeather", "{'city': 'Paris'}")), GOLD_WEATHER, 0.0, 0.0),  # Python dict, not JSON
    (_react(("getWeather", '["Paris"]')), GOLD_WEATHER, 0.0, 0.0),  # not an object
    (_react(WEATHER, ("getTime", '{"zone": CET}')), GOLD_TWO, 0.0, 0.0),  # one malformed call spoils the output
    ("Thought: step\nAction: getWeather\n", GOLD_WEATHER, 0.0, 0.0),  # missing Action Input
    ("Thought: step\nAction: ping\n", [{"Action": "ping", "Action_Input": "{}"}], 1.0, 1.0),  # none needed
    ("I don't know.", GOLD_WEATHER, 0.0, 0.0),  # no call at all
    ("", GOLD_WEATHER, 0.0, 0.0),
    ("Final Answer: hello", [], 1.0, 1.0),  # no call expected, none made
    (_react(WEATHER), [], 0.0, 0.0),
    (
        _react(("search", '{"q": {"text": "a}b", "n": 2}}')),
        [{"name": "search", "arguments": {"q": {"text": "a}b", "n": 2}}}],
        1.0,
        1.0,
    ),  # nested JSON
    (_react(WEATHER), [{"name": "getWeather", "arguments": '{"city": "Paris"}'}], 1.0, 1.0),  # OpenAI-style gold
    (
        _react(WEATHER),
        [{"type": "function", "function": {"name": "getWeather", "arguments": {"city": "Paris"}}}],
        1.0,
        1.0,
    ),
    (_react(WEATHER), json.dumps(GOLD_WEATHER), 1.0, 1.0),  # gold stored as a JSON string
    (_react(("getWeather", '{"city": "Paris"}   trailing text')), GOLD_WEATHER, 1.0, 1.0),
    ("Action: getWeather\nAction Input:\n" + "{" * 5000, GOLD_WEATHER, 0.0, 0.0),  # pathological nesting
]


class TestToolCall:
    @pytest.mark.parametrize(("completion", "gold", "exact", "partial"), TOOL_CASES)
    def test_table(self, completion, gold, exact, partial):
        assert tool_call_reward(prompts=["p"], completions=[completion], golden_answer=[gold]) == [exact]
        scores = ToolCallReward(partial_credit=True)(prompts=["p"], completions=[completion], golden_answer=[gold])
        assert scores == [pytest.approx(partial)]

    def test_conversational_and_batch(self):
        completions = [[{"role": "assistant", "content": _react(WEATHER)}], [{"role": "assistant", "content": "no"}]]
        assert tool_call_reward(prompts=["p", "p"], completions=completions, golden_answer=[GOLD_WEATHER] * 2) == [
            1.0,
            0.0,
        ]

    def test_unreadable_gold_is_skipped(self):
        assert tool_call_reward(completions=[_react(WEATHER)] * 2, golden_answer=[None, "not json"]) == [None, None]

    def test_parse_tool_calls(self):
        assert parse_tool_calls(_react(WEATHER, ("getTime", "{}"))) == [
            ("getWeather", {"city": "Paris"}),
            ("getTime", {}),
        ]
        assert parse_tool_calls("Action: a\nAction: b\nAction Input: {}") == [("a", None), ("b", {})]
        assert parse_tool_calls("Action: a\nAction Input: {oops}") is None


def plain_reward(prompts, completions, **kwargs):
    return [float(len(completion_text(c)) > 3) for c in completions]


def scaled_reward(prompts, completions, scale=1.0, **kwargs):
    return [scale * len(completion_text(c)) for c in completions]


async def async_reward(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [1.0 for _ in completions]


class LengthReward(RewardFunction):
    def score(self, prompt, completion, **row):
        return float(len(completion))


class CallableWithoutName:
    def __call__(self, prompts, completions, **kwargs):
        return [0.5] * len(completions)


class AsyncCallable:
    async def __call__(self, prompts, completions, **kwargs):
        return [2.0] * len(completions)


class TestNamingAndHelpers:
    def test_names(self):
        named_partial = functools.partial(scaled_reward, scale=2.0)
        named_partial.__name__ = "scaled_x2"
        funcs = [
            plain_reward,
            functools.partial(scaled_reward, scale=3.0),
            functools.partial(functools.partial(scaled_reward), scale=4.0),
            named_partial,
            LengthReward(),
            LengthReward(name="len"),
            CallableWithoutName(),
            async_reward,
            AsyncCallable(),
            lambda prompts, completions, **kw: [0.0] * len(completions),
            "org/some-reward-model",
        ]
        assert validate_reward_funcs(funcs) == [
            "plain_reward",
            "scaled_reward",
            "scaled_reward_2",  # deduplicated: GRPO would otherwise merge their metrics
            "scaled_x2",
            "length_reward",
            "len",
            "CallableWithoutName",
            "async_reward",
            "AsyncCallable",
            "<lambda>",
            "some-reward-model",
        ]
        assert get_reward_func_name(functools.partial(scaled_reward)) == "scaled_reward"
        assert validate_reward_funcs(None) == [] and validate_reward_funcs(plain_reward) == ["plain_reward"]
        assert LengthReward.__name__ == "LengthReward"  # the class keeps its own name

    def test_names_match_trl(self):
        from trl.trainer.utils import get_callable_name, is_async_callable

        for func in [
            plain_reward,
            functools.partial(scaled_reward, scale=3.0),
            LengthReward(),
            CallableWithoutName(),
            async_reward,
            AsyncCallable(),
        ]:
            assert get_reward_func_name(func) == get_callable_name(func)
            assert is_async_reward_func(func) == is_async_callable(func)

    def test_invalid_entries(self):
        with pytest.raises(TypeError, match=r"reward_funcs\[1\].*int"):
            validate_reward_funcs([plain_reward, 3])

    @pytest.mark.parametrize(
        ("func", "expected"),
        [
            (plain_reward, [1.0, 0.0]),
            (functools.partial(scaled_reward, scale=2.0), [10.0, 4.0]),
            (LengthReward(), [5.0, 2.0]),
            (CallableWithoutName(), [0.5, 0.5]),
            (async_reward, [1.0, 1.0]),
            (AsyncCallable(), [2.0, 2.0]),
        ],
    )
    def test_outputs_through_helpers(self, func, expected):
        completions = [[{"role": "assistant", "content": "hello"}], "hi"]
        kwargs = dict(
            prompts=["p", "p"],
            completions=completions,
            completion_ids=[[1], [2]],
            trainer_state=None,
            log_extra=None,
            log_metric=None,
            answer=["a", "b"],
        )
        name = validate_reward_funcs([func])[0]
        assert call_reward_safely(name, func, **kwargs) == expected
        assert ensure_sync(func)(**kwargs) == expected
        assert not is_async_reward_func(ensure_sync(func))
        assert get_reward_func_name(ensure_sync(func)) == name

    def test_async_from_inside_a_running_loop(self):
        async def caller():
            return call_reward_safely("async_reward", async_reward, prompts=["p"], completions=["c"])

        assert asyncio.run(caller()) == [1.0]

    def test_reward_function_rows(self):
        seen = []

        class Recorder(RewardFunction):
            def score(self, prompt, completion, **row):
                seen.append((prompt, completion, row))
                return None

        out = Recorder()(
            prompts=["p1", "p2"],
            completions=["c1", "c2"],
            completion_ids=[[1], [2]],
            answer=["a1", "a2"],
            trainer_state="S",
            log_metric=print,
        )
        assert out == [None, None]
        assert seen == [
            ("p1", "c1", {"answer": "a1", "completion_ids": [1]}),
            ("p2", "c2", {"answer": "a2", "completion_ids": [2]}),
        ]

    def test_combine_rewards(self):
        def maybe(prompts, completions, **kwargs):
            return [None, 1.0]

        logged = {}
        combined = combine_rewards([plain_reward, LengthReward(), maybe], [2.0, 0.5, 1.0], name="mix")
        assert combined.__name__ == "mix" and get_reward_func_name(combined) == "mix"
        assert combined(prompts=["p", "p"], completions=["hello", "hi"], log_metric=logged.__setitem__) == [4.5, 2.0]
        assert logged == {"mix/plain_reward": 0.5, "mix/length_reward": 3.5, "mix/maybe": 1.0}
        assert combine_rewards([maybe])(prompts=["p", "p"], completions=["a", "b"]) == [None, 1.0]
        with pytest.raises(ValueError, match="2 weights for 1 reward functions"):
            combine_rewards([plain_reward], [1.0, 2.0])


def test_weighted_reward_sum_leaves_out_none_and_nan():
    outputs = [[1.0, None, float("nan"), 0.5], [2.0, 3.0, None, float("nan")]]
    assert weighted_reward_sum(outputs, [0.5, 2.0]) == [4.5, 6.0, None, 0.25]
    with pytest.raises(ValueError):
        weighted_reward_sum(outputs, [1.0])  # one weight per function


class TestErrors:
    def test_wrong_length(self):
        with pytest.raises(ValueError, match="reward function 'my_reward' returned 3 values for 8 completions"):
            check_reward_outputs("my_reward", [1.0, 2.0, 3.0], 8)

    @pytest.mark.parametrize(
        ("outputs", "message"),
        [
            (1.0, "reward function 'my_reward' returned a float"),
            ("1.0", "reward function 'my_reward' returned a str"),
            ({"a": 1.0}, "reward function 'my_reward' returned a dict"),
            ([1.0, "x"], r"reward function 'my_reward' returned a non-numeric value 'x' \(str\) at index 1"),
            ([1.0, [2.0]], r"non-numeric value \[2.0\] \(list\) at index 1"),
        ],
    )
    def test_wrong_type(self, outputs, message):
        with pytest.raises(ValueError, match=message):
            check_reward_outputs("my_reward", outputs, 2)

    def test_accepted_outputs(self):
        torch = pytest.importorskip("torch")
        assert check_reward_outputs("f", [1, None, True, 0.5], 4) == [1.0, None, 1.0, 0.5]
        assert check_reward_outputs("f", (1,), 1) == [1.0]
        assert check_reward_outputs("f", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]
        assert check_reward_outputs("f", [torch.tensor(3.0)], 1) == [3.0]

    def test_call_reward_safely_wraps_exceptions(self):
        def broken_reward(prompts, completions, **kwargs):
            raise KeyError("answer")

        with pytest.raises(RuntimeError, match=r"reward function 'broken_reward' raised KeyError: 'answer'") as info:
            call_reward_safely("broken_reward", broken_reward, prompts=["p"], completions=["c"])
        assert isinstance(info.value.__cause__, KeyError)

        async def broken_async(prompts, completions, **kwargs):
            raise ValueError("boom")

        with pytest.raises(RuntimeError, match="reward function 'broken_async' raised ValueError: boom"):
            call_reward_safely("broken_async", broken_async, prompts=["p"], completions=["c"])

    def test_call_reward_safely_checks_length(self):
        with pytest.raises(ValueError, match="reward function 'short' returned 1 values for 2 completions"):
            call_reward_safely(
                "short", lambda prompts, completions, **kw: [1.0], prompts=["a", "b"], completions=["a", "b"]
            )

    def test_combined_reward_names_the_failing_component(self):
        def bad_len(prompts, completions, **kwargs):
            return [1.0]

        with pytest.raises(ValueError, match="reward function 'bad_len' returned 1 values for 2 completions"):
            combine_rewards([plain_reward, bad_len])(prompts=["a", "b"], completions=["a", "b"])


# ---- rewards ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [INF, -INF])
def test_infinite_reward_names_the_function_and_index(value):
    with pytest.raises(ValueError, match=r"reward function 'r' returned -?inf at index 1; rewards must be finite"):
        check_reward_outputs("r", [0.0, value, None], 3)
    assert check_reward_outputs("r", [0.0, NAN, None], 3)[2] is None  # NaN and None still mean "no reward"


# ---- a reward function failing on one of two processes -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_reward_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    """Rank 1's reward function raises; both ranks must raise the same named error, promptly, before any update."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
    from common import make_model_dir
    from launch import accelerate_launch, failure_report

    model_dir = make_model_dir(str(tmp_path / "model"), tied=False)
    rc, output, _ = accelerate_launch(
        "examples/accelerate_configs/multi_gpu.yaml", "run_reward_failure.py", "--model-dir", model_dir,
        "--out", str(tmp_path), timeout=300,
    )  # fmt: skip
    assert rc == 0, failure_report(output)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["type"] == "RuntimeError", report
        assert "reward function 'exploding_reward' raised ValueError: boom on rank 1" in report["message"], report
        assert "on process 1 of 2" in report["message"], report
        assert report["params_unchanged"] and report["global_step"] == 0, report
    assert reports[0]["message"] == reports[1]["message"]
    # no rank waited for a collective timeout (gloo's default is 30 minutes)
    assert max(r["seconds_to_error"] for r in reports) < 120, reports
