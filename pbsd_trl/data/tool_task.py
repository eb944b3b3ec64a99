"""A small synthetic ReAct tool-use task in the format of SDFT's ToolAlpaca data.

Eight made-up APIs (`weather`, `fx`, `time`, `stock`, `timer`, `translate`, `route`,
`news`). Each example shows the student three tools by name and a one-line description, the answer
format and a question:

```
Tools: stock: share price; fx: convert money; news: headlines.
Format: Action: <tool>
Action Input: <json>
Q: 20 dollars in euros?
```

and the expected answer is one call (the `golden_answer`):

```
Action: fx
Action Input: {"amt":20,"from":"USD","to":"EUR"}
```

The argument names and conventions (ISO currency codes, tickers, minutes, language codes, defaults)
are not in the student's prompt: they are in the privileged context, which holds the tool's
documentation and a demonstration response, as SDFT's teacher sees a golden response. Strings are kept
short (prompts <= 150 characters, completions <= 60) so that a tiny character-level model can learn it.

Columns: `prompt`, `privileged_context`, `golden_answer` (a list of ``{"Action": name,
"Action_Input": json string}``, SDFT's format). `pbsd_trl.rewards.tool_call_reward` implements SDFT's check
(same multiset of actions and same merged input dict).
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from typing import Any, Literal

from datasets import Dataset


__all__ = [
    "EVAL_SEED",
    "TOOLS",
    "TOOL_TEACHER_TEMPLATE",
    "make_tool_dataset",
    "sample_tool_example",
    "tool_completion",
]

TOOL_TEACHER_TEMPLATE = "{prompt}\n{privileged_context}"
"""Teacher prompt template: the student's prompt followed by the privileged context (tool
documentation and a demonstration response)."""

EVAL_SEED = 2_000_003
"""Seed of the fixed held-out examples."""

EVAL_SIZE = 200
"""Number of fixed held-out examples."""

TOOLS_PER_PROMPT = 3

_CITIES = ["Paris", "Rome", "Tokyo", "Oslo", "Cairo", "Lima", "Berlin", "Madrid", "Sydney", "Dublin", "Seoul", "Quito"]
_CURRENCIES = {"dollars": "USD", "euros": "EUR", "yen": "JPY", "pounds": "GBP", "francs": "CHF", "pesos": "MXN"}
_COMPANIES = {"Apple": "AAPL", "Tesla": "TSLA", "Google": "GOOG", "Amazon": "AMZN", "Nvidia": "NVDA", "Intel": "INTC"}
_LANGUAGES = {"French": "fr", "German": "de", "Spanish": "es", "Italian": "it", "Japanese": "ja"}
_WORDS = ["hello", "thanks", "water", "bread", "friend", "night", "cat", "goodbye"]
_TOPICS = ["sports", "tech", "science", "music", "travel", "health"]

TOOLS: dict[str, dict[str, str]] = {
    "weather": {"brief": "forecast", "doc": "weather(city,unit): unit C, or F if asked"},
    "fx": {"brief": "convert money", "doc": "fx(amt,from,to): ISO currency codes"},
    "time": {"brief": "local time", "doc": "time(city): city name"},
    "stock": {"brief": "share price", "doc": "stock(sym): ticker symbol"},
    "timer": {"brief": "countdown", "doc": "timer(min): minutes, 1 hour=60"},
    "translate": {"brief": "translate", "doc": "translate(text,lang): 2-letter lang"},
    "route": {"brief": "directions", "doc": "route(src,dst): city names"},
    "news": {"brief": "headlines", "doc": "news(topic,n): n default 5"},
}
"""The made-up APIs: name -> `brief` (shown to the student) and `doc` (privileged)."""


def _question(tool: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A question for `tool` and the expected arguments (in the documented order)."""
    if tool == "weather":
        city = rng.choice(_CITIES)
        q, unit = rng.choice(
            [("Weather in {c}?", "C"), ("Is it cold in {c}?", "C"), ("{c} weather in fahrenheit?", "F")]
        )
        return q.format(c=city), {"city": city, "unit": unit}
    if tool == "fx":
        amt = rng.randint(1, 999)
        src, dst = rng.sample(sorted(_CURRENCIES), 2)
        q = rng.choice(["{a} {s} in {d}?", "Convert {a} {s} to {d}."])
        return q.format(a=amt, s=src, d=dst), {"amt": amt, "from": _CURRENCIES[src], "to": _CURRENCIES[dst]}
    if tool == "time":
        city = rng.choice(_CITIES)
        q = rng.choice(["What time is it in {c}?", "Local time in {c}?", "Clock in {c} now?"])
        return q.format(c=city), {"city": city}
    if tool == "stock":
        company = rng.choice(sorted(_COMPANIES))
        q = rng.choice(["{c} stock price?", "How is {c} trading?", "Price of {c} shares?"])
        return q.format(c=company), {"sym": _COMPANIES[company]}
    if tool == "timer":
        if rng.random() < 0.3:
            hours = rng.randint(1, 3)
            q = rng.choice(["Timer for {h} hours.", "Set a timer of {h} hours."]) if hours > 1 else "Timer for 1 hour."
            return q.format(h=hours), {"min": 60 * hours}
        minutes = rng.randint(1, 59)
        q = rng.choice(["Set a timer for {m} minutes.", "Wake me in {m} min."])
        return q.format(m=minutes), {"min": minutes}
    if tool == "translate":
        word, language = rng.choice(_WORDS), rng.choice(sorted(_LANGUAGES))
        q = rng.choice(["Say {w} in {l}.", "Translate {w} to {l}."])
        return q.format(w=word, l=language), {"text": word, "lang": _LANGUAGES[language]}
    if tool == "route":
        src, dst = rng.sample(_CITIES, 2)
        q = rng.choice(["Route from {s} to {d}?", "Way from {s} to {d}?"])
        return q.format(s=src, d=dst), {"src": src, "dst": dst}
    if tool == "news":
        topic = rng.choice(_TOPICS)
        if rng.random() < 0.5:
            return rng.choice(["Any {t} news?", "Latest {t} headlines?"]).format(t=topic), {"topic": topic, "n": 5}
        n = rng.randint(1, 9)
        return f"Top {n} {topic} headlines?", {"topic": topic, "n": n}
    raise ValueError(f"Unknown tool {tool!r}")


def _dump(args: dict[str, Any]) -> str:
    return json.dumps(args, separators=(",", ":"))


def tool_completion(golden_answer: list[dict[str, str]]) -> str:
    """The response the model is trained to produce for `golden_answer` (one ReAct step per call)."""
    return "\n".join(f"Action: {call['Action']}\nAction Input: {call['Action_Input']}" for call in golden_answer)


def sample_tool_example(rng: random.Random) -> dict[str, Any]:
    """Draws one example: a dict with `question`, `prompt` (plain text), `privileged_context` and
    `golden_answer`."""
    tool = rng.choice(sorted(TOOLS))
    question, args = _question(tool, rng)
    shown = [tool] + rng.sample([t for t in sorted(TOOLS) if t != tool], TOOLS_PER_PROMPT - 1)
    rng.shuffle(shown)
    tools_line = "; ".join(f"{t}: {TOOLS[t]['brief']}" for t in shown)
    prompt = f"Tools: {tools_line}.\nFormat: Action: <tool>\nAction Input: <json>\nQ: {question}"
    golden_answer = [{"Action": tool, "Action_Input": _dump(args)}]
    privileged_context = f"Doc: {TOOLS[tool]['doc']}\nExample: {tool_completion(golden_answer)}"
    return {
        "question": question,
        "prompt": prompt,
        "privileged_context": privileged_context,
        "golden_answer": golden_answer,
    }


@lru_cache(maxsize=1)
def _eval_examples() -> tuple[dict[str, Any], ...]:
    rng = random.Random(f"tool-eval-{EVAL_SEED}")
    seen: set[str] = set()
    examples = []
    while len(examples) < EVAL_SIZE:
        example = sample_tool_example(rng)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            examples.append(example)
    return tuple(examples)


@lru_cache(maxsize=1)
def held_out_prompts() -> frozenset[str]:
    """Prompts of the fixed held-out examples; never used for training."""
    return frozenset(example["prompt"] for example in _eval_examples())


def train_examples(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """`n` training examples from `rng`, skipping every held-out prompt (duplicates are possible)."""
    excluded = held_out_prompts()
    examples = []
    while len(examples) < n:
        example = sample_tool_example(rng)
        if example["prompt"] not in excluded:
            examples.append(example)
    return examples


def make_tool_dataset(
    split: Literal["train", "eval"] = "train",
    n: int | None = None,
    seed: int = 0,
    conversational: bool = True,
) -> Dataset:
    """Builds the tool-use dataset.

    Args:
        split: `"train"`: `n` (default 1000) examples drawn with `seed`, never containing a held-out
            prompt. `"eval"`: the first `n` (default and at most 200) fixed held-out examples (`seed`
            is ignored). Splits are disjoint by prompt string (tool menu + question).
        n: Number of rows.
        seed: Seed of the training examples.
        conversational: If `True`, `prompt` is a one-turn conversation; otherwise the plain string.
            The base model of [`~pbsd_trl.tiny.get_base_model`] is trained on the conversational format.

    Returns:
        A [`~datasets.Dataset`] with columns `prompt`, `privileged_context` (documentation of the
        right tool and a demonstration response) and `golden_answer` (list of ``{"Action",
        "Action_Input"}``).
    """
    if split == "train":
        examples = train_examples(random.Random(f"tool-train-{seed}"), 1000 if n is None else n)
    elif split == "eval":
        n = EVAL_SIZE if n is None else n
        if n > EVAL_SIZE:
            raise ValueError(f"The eval split has {EVAL_SIZE} examples; got n={n}.")
        examples = list(_eval_examples())[:n]
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return Dataset.from_dict(
        {
            "prompt": [
                [{"role": "user", "content": e["prompt"]}] if conversational else e["prompt"] for e in examples
            ],
            "privileged_context": [e["privileged_context"] for e in examples],
            "golden_answer": [e["golden_answer"] for e in examples],
        }
    )
