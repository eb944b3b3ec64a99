"""A small synthetic ReAct tool-use task in the format of SDFT's ToolAlpaca data.

Eight made-up APIs (`weather`, `fx`, `time`, `stock`, `timer`, `translate`, `route`, `news`). Each example shows
the student three tools by name and a one-line description and a question:

```
Tools: stock: share price; fx: convert money; news: headlines.
Q: 20 dollars in euros?
```

and the expected answer is one call (the `golden_answer`):

```
Action: fx
Action Input: {"amount":20,"src":"USD","dst":"EUR"}
```

The argument names of each API ([`TOOLS`]: `signature`) are not in the student's prompt, and the base model's
student has not been told them: its warm start answers with the argument names of one of three plausible
signatures drawn at random (the real one and two `decoys`), so it is right about a third of the time at best. They
are in the privileged context, with the argument conventions (ISO currency codes, tickers, minutes, language codes,
defaults): the tool's documentation and a demonstration of a *similar* call (the same tool, another question and
other argument values), never the golden call. The teacher still reads the values off the question and converts
them (`dollars` -> `USD`, `2 hours` -> `120`, ...). The signatures are fixed, so the student can learn them from the
teacher's samples or from the reward. Strings are kept short (prompts <= 100 characters, completions <= 64) so that
a tiny character-level model can learn it.

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
    "tool_call",
    "tool_completion",
]

TOOL_TEACHER_TEMPLATE = "{prompt}\n{privileged_context}"
"""Teacher prompt template: the student's prompt followed by the privileged context (tool
documentation and a demonstration of a similar call)."""

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

TOOLS: dict[str, dict[str, Any]] = {
    "weather": {
        "brief": "forecast",
        "signature": ("place", "unit"),
        "decoys": (("city", "units"), ("location", "scale")),
        "note": "unit C, or F if asked",
    },
    "fx": {
        "brief": "convert money",
        "signature": ("amount", "src", "dst"),
        "decoys": (("amt", "from", "to"), ("value", "base", "target")),
        "note": "ISO currency codes",
    },
    "time": {"brief": "local time", "signature": ("zone",), "decoys": (("city",), ("place",)), "note": "city name"},
    "stock": {
        "brief": "share price",
        "signature": ("ticker",),
        "decoys": (("sym",), ("symbol",)),
        "note": "ticker symbol",
    },
    "timer": {
        "brief": "countdown",
        "signature": ("length",),
        "decoys": (("min",), ("minutes",)),
        "note": "minutes, 1 hour=60",
    },
    "translate": {
        "brief": "translate",
        "signature": ("text", "to"),
        "decoys": (("word", "lang"), ("q", "target")),
        "note": "2-letter language code",
    },
    "route": {
        "brief": "directions",
        "signature": ("start", "dest"),
        "decoys": (("src", "dst"), ("origin", "end")),
        "note": "city names",
    },
    "news": {
        "brief": "headlines",
        "signature": ("topic", "count"),
        "decoys": (("category", "n"), ("q", "limit")),
        "note": "count default 5",
    },
}
"""The made-up APIs: name -> `brief` (shown to the student), `signature` (the argument names, privileged), `decoys`
(two other plausible signatures: what a student who was not told guesses among) and `note` (the documented
conventions, privileged)."""


def tool_doc(tool: str) -> str:
    """The documentation line of `tool`, e.g. `"fx(amount,src,dst): ISO currency codes"`."""
    return f"{tool}({','.join(TOOLS[tool]['signature'])}): {TOOLS[tool]['note']}"


def _question(tool: str, rng: random.Random) -> tuple[str, list[Any]]:
    """A question for `tool` and the values of its arguments (in the order of its signature)."""
    if tool == "weather":
        city = rng.choice(_CITIES)
        q, unit = rng.choice(
            [("Weather in {c}?", "C"), ("Is it cold in {c}?", "C"), ("{c} weather in fahrenheit?", "F")]
        )
        return q.format(c=city), [city, unit]
    if tool == "fx":
        amt = rng.randint(1, 999)
        src, dst = rng.sample(sorted(_CURRENCIES), 2)
        q = rng.choice(["{a} {s} in {d}?", "Convert {a} {s} to {d}."])
        return q.format(a=amt, s=src, d=dst), [amt, _CURRENCIES[src], _CURRENCIES[dst]]
    if tool == "time":
        city = rng.choice(_CITIES)
        q = rng.choice(["What time is it in {c}?", "Local time in {c}?", "Clock in {c} now?"])
        return q.format(c=city), [city]
    if tool == "stock":
        company = rng.choice(sorted(_COMPANIES))
        q = rng.choice(["{c} stock price?", "How is {c} trading?", "Price of {c} shares?"])
        return q.format(c=company), [_COMPANIES[company]]
    if tool == "timer":
        if rng.random() < 0.3:
            hours = rng.randint(1, 3)
            q = rng.choice(["Timer for {h} hours.", "Set a timer of {h} hours."]) if hours > 1 else "Timer for 1 hour."
            return q.format(h=hours), [60 * hours]
        minutes = rng.randint(1, 59)
        q = rng.choice(["Set a timer for {m} minutes.", "Wake me in {m} min."])
        return q.format(m=minutes), [minutes]
    if tool == "translate":
        word, language = rng.choice(_WORDS), rng.choice(sorted(_LANGUAGES))
        q = rng.choice(["Say {w} in {l}.", "Translate {w} to {l}."])
        return q.format(w=word, l=language), [word, _LANGUAGES[language]]
    if tool == "route":
        src, dst = rng.sample(_CITIES, 2)
        q = rng.choice(["Route from {s} to {d}?", "Way from {s} to {d}?"])
        return q.format(s=src, d=dst), [src, dst]
    if tool == "news":
        topic = rng.choice(_TOPICS)
        if rng.random() < 0.5:
            return rng.choice(["Any {t} news?", "Latest {t} headlines?"]).format(t=topic), [topic, 5]
        n = rng.randint(1, 9)
        return f"Top {n} {topic} headlines?", [topic, n]
    raise ValueError(f"Unknown tool {tool!r}")


def _dump(args: dict[str, Any]) -> str:
    return json.dumps(args, separators=(",", ":"))


def tool_call(tool: str, values: list[Any], signature: tuple[str, ...] | None = None) -> dict[str, str]:
    """The call `{"Action", "Action_Input"}` of `tool` with argument `values` under `signature` (default: the
    tool's real one, [`TOOLS`])."""
    names = TOOLS[tool]["signature"] if signature is None else signature
    return {"Action": tool, "Action_Input": _dump(dict(zip(names, values, strict=True)))}


def tool_completion(golden_answer: list[dict[str, str]]) -> str:
    """The response the model is trained to produce for `golden_answer` (one ReAct step per call)."""
    return "\n".join(f"Action: {call['Action']}\nAction Input: {call['Action_Input']}" for call in golden_answer)


def sample_tool_example(rng: random.Random) -> dict[str, Any]:
    """Draws one example: a dict with `question`, `prompt` (plain text), `privileged_context`, `golden_answer`,
    `tool` and `values` (the argument values, in the order of the tool's signature)."""
    tool = rng.choice(sorted(TOOLS))
    question, values = _question(tool, rng)
    shown = [tool] + rng.sample([t for t in sorted(TOOLS) if t != tool], TOOLS_PER_PROMPT - 1)
    rng.shuffle(shown)
    tools_line = "; ".join(f"{t}: {TOOLS[t]['brief']}" for t in shown)
    prompt = f"Tools: {tools_line}.\nQ: {question}"
    golden_answer = [tool_call(tool, values)]
    while True:  # a similar call: the same tool, another question, other argument values
        demo_question, demo_values = _question(tool, rng)
        if demo_values != values:
            break
    demo = tool_completion([tool_call(tool, demo_values)])
    privileged_context = f"Doc: {tool_doc(tool)}\nExample: {demo_question}\n{demo}"
    return {
        "question": question,
        "prompt": prompt,
        "privileged_context": privileged_context,
        "golden_answer": golden_answer,
        "tool": tool,
        "values": values,
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
            The base model of [`~pbsd_trl.recipes.tiny.get_base_model`] is trained on the conversational format.

    Returns:
        A [`~datasets.Dataset`] with columns `prompt`, `privileged_context` (documentation of the
        right tool and a demonstration of a similar call) and `golden_answer` (list of ``{"Action",
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
