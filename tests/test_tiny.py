import json
import os
import random
import shutil
import string

import pytest
import torch
from transformers import AutoModelForCausalLM

from pbsd_trl.recipes import tiny
from pbsd_trl.recipes.tiny import (
    build_char_tokenizer,
    build_random_model,
    get_base_model,
    load_tokenizer,
    sft,
    shipped,
    tiny_model_config,
    warm_start,
)


def test_tokenizer_round_trip(tokenizer):
    ids = tokenizer(string.printable, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(string.printable)  # one token per character
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == string.printable
    for char in string.printable:
        assert tokenizer.decode(tokenizer.encode(char, add_special_tokens=False)) == char
    text = 'Action: fx\nAction Input: {"amt":20}  347+589= 7+9+0=16>6;#### 936'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.encode("é", add_special_tokens=False) == [tokenizer.unk_token_id]
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "347+589="}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|user|>347+589=<|assistant|>"
    )
    full = messages + [{"role": "assistant", "content": "#### 936"}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == "<|user|>347+589=<|assistant|>#### 936<|end|>"
    system = [{"role": "system", "content": "Be brief."}] + messages
    assert tokenizer.apply_chat_template(system, tokenize=False) == "Be brief.\n<|user|>347+589="
    # TRL's conversational prompt path
    out = tokenizer.apply_chat_template(
        [messages, [{"role": "user", "content": "1+2="}]], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert out["input_ids"][1] == tokenizer.convert_tokens_to_ids(["<|user|>", "1", "+", "2", "=", "<|assistant|>"])
    ids = out["input_ids"][0] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "347+589="


def test_left_padding_survives_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.padding_side == "left"
    assert loaded.chat_template == tokenizer.chat_template
    batch = loaded(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [loaded.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1]
    assert loaded.encode(string.printable, add_special_tokens=False) == tokenizer.encode(
        string.printable, add_special_tokens=False
    )


def test_model_configs(tokenizer):
    config = tiny_model_config(len(tokenizer))
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (128, 4, 512)
    assert config.tie_word_embeddings
    assert tiny_model_config(len(tokenizer), hidden_size=64).hidden_size == 64
    base = build_random_model(tokenizer, size="base")
    assert 1.0e6 < sum(p.numel() for p in base.parameters()) < 1.1e6


def test_random_model_forward_and_generate(tokenizer):
    model = build_random_model(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer.apply_chat_template(
        [[{"role": "user", "content": "12+3="}], [{"role": "user", "content": "1+2="}]],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        padding=True,
        return_tensors="pt",
    )
    logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=5, do_sample=True)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 5
    # same seed, same weights
    assert torch.equal(
        build_random_model(tokenizer, seed=1).model.embed_tokens.weight,
        build_random_model(tokenizer, seed=1).model.embed_tokens.weight,
    )


@pytest.mark.parametrize("task", ["math", "tool_use"])
def test_warm_start_learns(task):
    steps_seen = []
    model, tok = warm_start(
        task,
        steps=12,
        model_overrides=tiny.TEST_MODEL_OVERRIDES,
        batch_size=8,
        progress_bar=False,
        callback=lambda step, model, tokenizer: steps_seen.append(step),
    )
    assert steps_seen == list(range(1, 13)) and not model.training
    rows = sft._task_sampler(task, random.Random(0), "medium")(8)
    input_ids, labels = sft._sft_batch(tok, [r[0] for r in rows], [r[2] for r in rows])
    assert input_ids.shape[1] % 16 == 0
    assert (labels != -100).sum() == sum(len(r[2]) + 1 for r in rows)  # completion + <|end|> only
    untrained = build_random_model(tok, size="base", **tiny.TEST_MODEL_OVERRIDES)
    with torch.no_grad():
        assert model(input_ids=input_ids, labels=labels).loss < untrained(input_ids=input_ids, labels=labels).loss


def test_get_base_model_builds_once_and_caches(tmp_path, monkeypatch):
    kwargs = dict(
        cache_dir=tmp_path, steps=2, progress_bar=False, model_overrides=tiny.TEST_MODEL_OVERRIDES, batch_size=4
    )
    path = get_base_model("math", **kwargs)
    assert os.path.basename(path).startswith("math-")
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary directory left over
    metadata = json.loads(open(os.path.join(path, "pbsd_trl_base.json")).read())
    assert metadata["steps"] == 2 and metadata["task"] == "math"

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    assert tokenizer.padding_side == "left"
    assert model.config.vocab_size == len(tokenizer)
    batch = tokenizer.apply_chat_template(
        [[{"role": "user", "content": "12+3="}]], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert model.generate(**batch, max_new_tokens=3).shape[1] <= batch["input_ids"].shape[1] + 3

    def fail(*args, **kwargs):
        raise AssertionError("the cached model must be reused")

    monkeypatch.setattr(shipped, "warm_start", fail)
    assert get_base_model("math", **kwargs) == path
    # a different recipe is a different cache entry; an interrupted build leaves nothing behind
    with pytest.raises(AssertionError):
        get_base_model("math", **dict(kwargs, steps=3))
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    monkeypatch.setenv("PBSD_TRL_CACHE", str(tmp_path / "env"))
    assert tiny.default_cache_dir() == tmp_path / "env"


def test_get_base_model_force_rebuilds(tmp_path):
    kwargs = dict(
        cache_dir=tmp_path, steps=1, progress_bar=False, model_overrides=tiny.TEST_MODEL_OVERRIDES, batch_size=4
    )
    path = get_base_model("tool_use", **kwargs)
    first = os.path.getmtime(os.path.join(path, "pbsd_trl_base.json"))
    assert get_base_model("tool_use", force=True, **kwargs) == path
    assert os.path.getmtime(os.path.join(path, "pbsd_trl_base.json")) >= first
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]
    with pytest.raises(ValueError):
        get_base_model("chess", cache_dir=tmp_path)


# ---- the shipped base models --------------------------------------------------------------------------------------
SHIPPED_TASKS = ("math", "tool_use")


@pytest.mark.parametrize("task", SHIPPED_TASKS)
def test_shipped_base_model_matches_its_checksums_and_loads(task, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the default recipe must load the shipped copy, not build")

    monkeypatch.setattr(shipped, "warm_start", fail)
    path = get_base_model(task)
    assert os.path.dirname(path) == str(tiny.SHIPPED_BASE_MODELS_DIR)
    manifest = tiny.verify_base_model(path)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["sha256"])
    assert manifest["task"] == task and manifest["steps"] == tiny.DEFAULT_WARM_START_STEPS[task]
    assert manifest["version"] == tiny.BASE_MODEL_VERSION
    # the recorded recipe is the one the code would build now (so a rebuild reproduces the shipped model's recipe)
    spec = shipped._base_model_spec(task, tiny.DEFAULT_WARM_START_STEPS[task], 0, {})
    assert {key: manifest[key] for key in spec} == json.loads(json.dumps(spec, default=str))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    assert model.config.vocab_size == len(tokenizer) == len(build_char_tokenizer())
    assert tokenizer.padding_side == "left" and tokenizer.eos_token == "<|end|>"
    assert model.num_parameters() > 1_000_000
    # the shipped weights are warm-started, not random: far lower loss on the task's own format than at init
    rows = sft._task_sampler(task, random.Random(1), "medium")(16)
    input_ids, labels = sft._sft_batch(tokenizer, [r[0] for r in rows], [r[2] for r in rows])
    untrained = build_random_model(tokenizer, size="base")
    with torch.no_grad():
        assert (
            model(input_ids=input_ids, labels=labels).loss < untrained(input_ids=input_ids, labels=labels).loss - 1.0
        )


def test_base_model_checksum_errors_name_the_file(tmp_path):
    copy = tmp_path / "math"
    shutil.copytree(tiny.SHIPPED_BASE_MODELS_DIR / "math", copy)
    tiny.verify_base_model(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(tiny.BaseModelChecksumError, match=r"model\.safetensors does not match its checksum"):
        tiny.verify_base_model(copy)
    weights.unlink()
    with pytest.raises(tiny.BaseModelChecksumError, match=r"model\.safetensors is missing"):
        tiny.verify_base_model(copy)
    (copy / "pbsd_trl_base.json").unlink()
    with pytest.raises(tiny.BaseModelChecksumError, match="pbsd_trl_base.json is missing"):
        tiny.verify_base_model(copy)


def test_shipped_base_model_is_checked_on_load(tmp_path, monkeypatch):
    shipped_dir = tmp_path / "base_models"
    shutil.copytree(tiny.SHIPPED_BASE_MODELS_DIR / "tool_use", shipped_dir / "tool_use")
    monkeypatch.setattr(shipped, "SHIPPED_BASE_MODELS_DIR", shipped_dir)
    assert get_base_model("tool_use") == str(shipped_dir / "tool_use")
    with open(shipped_dir / "tool_use" / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(tiny.BaseModelChecksumError, match=r"config\.json does not match") as err:
        get_base_model("tool_use")
    assert "Reinstall pbsd-trl" in str(err.value)


def test_build_flag_bypasses_the_shipped_copy(tmp_path, monkeypatch):
    calls = []

    def fake_warm_start(task, steps, seed, output_dir, **kwargs):
        calls.append((task, steps, seed))
        build_char_tokenizer().save_pretrained(output_dir)
        build_random_model(size="test").save_pretrained(output_dir)

    monkeypatch.setattr(shipped, "warm_start", fake_warm_start)
    path = get_base_model("math", cache_dir=tmp_path, build=True, progress_bar=False)
    assert calls == [("math", tiny.DEFAULT_WARM_START_STEPS["math"], 0)]
    assert os.path.dirname(path) == str(tmp_path)
    assert tiny.verify_base_model(path)["cpu"]  # the manifest says where it was built
    assert get_base_model("math", cache_dir=tmp_path, build=True) == path and len(calls) == 1  # cached


# What the shipped base models are for: a teacher (the same network with the privileged context, a hint that is not
# the answer) much better than its student, and a student right often enough for RL to get mixed groups. Targets of the
# task table recorded in `pbsd_trl_base.json` (measured on the build machine by `base_model_quality`, Avg@8 on the
# held-out problems and on their test rows 100-199).
TASK_TARGETS = {"teacher_min": 0.75, "student_max": 0.45, "student_min": 0.1}


@pytest.mark.parametrize("task", SHIPPED_TASKS)
def test_shipped_base_model_recorded_task_table(task):
    quality = tiny.verify_base_model(tiny.SHIPPED_BASE_MODELS_DIR / task)["quality"]
    for split in ("", "_test"):
        assert quality[f"teacher_avg_at_8{split}"] >= TASK_TARGETS["teacher_min"], quality
        student = quality[f"student_avg_at_8{split}"]
        assert TASK_TARGETS["student_min"] <= student <= TASK_TARGETS["student_max"], quality
    assert quality["teacher_self_log_prob"] < 0 and quality["teacher_mean_completion_tokens"] >= 40, quality


@pytest.mark.parametrize("task", SHIPPED_TASKS)
def test_shipped_base_model_teacher_is_much_better_here(task):
    """The gap holds on this machine's kernels too (any CPU, e.g. under `ATEN_CPU_CAPABILITY=avx2`): Avg@4 on 48
    held-out problems. Student and teacher are near 0.3 and 0.85 on the build machine; the bands are wide (the
    standard error on 48 problems is about 0.05) but exclude a teacher that is no better than its student."""
    from pbsd_trl.recipes.data.tasks import TASKS
    from pbsd_trl.recipes.evaluate import evaluate_avg_at_k

    spec = TASKS[task]
    path = get_base_model(task)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    dataset = spec.make_dataset("eval", 48, 0)
    scores = {}
    for who, privileged in (("student", False), ("teacher", True)):
        report = evaluate_avg_at_k(
            model, tokenizer, dataset, list(spec.reward_funcs), 4, max_new_tokens=80, seed=0, progress_bar=False,
            with_privileged_context=privileged, teacher_prompt_template=spec.teacher_prompt_template,
        )  # fmt: skip
        scores[who] = report["avg_at_k"]
    assert scores["teacher"] >= 0.6 and 0.05 <= scores["student"] <= 0.55, scores
    assert scores["teacher"] - scores["student"] >= 0.3, scores


@pytest.mark.slow
def test_rebuild_with_the_committed_command_has_the_documented_quality(tmp_path):
    """The builder cannot rot: the committed command rebuilds a model of the documented quality.

    Rebuilds the math model (1,500 steps, about 12 CPU-minutes; the tool-use model's longer prompts take about 30) with
    the shipped copies' command (up to 2 threads, as many as this process has, instead of 1 to halve the time: the thread count
    moves the weights in the last bits, like another CPU does, which the band allows for; more threads than the process
    has would oversubscribe the cores), and checks the quality band documented in `DEFAULT_WARM_START_STEPS` and recorded in the
    shipped manifest. The band is wide on purpose: the warm start's float trajectory, and so the exact accuracy,
    depends on the CPU (see `get_base_model`); the band holds what self-distillation needs, a teacher that is
    clearly better than its student.
    """
    import subprocess
    import sys

    output = tmp_path / "math"
    command = [
        sys.executable,
        "-m",
        "pbsd_trl.recipes.tiny",
        "build",
        "math",
        "--output_dir",
        str(output),
        "--num_threads",
        str(min(2, torch.get_num_threads())),
    ]
    subprocess.run(command, check=True, timeout=3600, env=dict(os.environ, TQDM_DISABLE="1"))
    manifest = tiny.verify_base_model(output)
    shipped_manifest = tiny.verify_base_model(tiny.SHIPPED_BASE_MODELS_DIR / "math")
    assert set(manifest["sha256"]) == set(shipped_manifest["sha256"])
    spec_keys = ("version", "task", "steps", "seed", "vocab", "special_tokens", "config", "warm_start")
    assert {key: manifest[key] for key in spec_keys} == {key: shipped_manifest[key] for key in spec_keys}
    quality = manifest["quality"]
    print(quality, "shipped:", shipped_manifest["quality"])
    # documented band (`DEFAULT_WARM_START_STEPS`): a student that answers part of the held-out problems (it guesses
    # the operation: at most 11/27 right) and a teacher much better than it, on another CPU's float trajectory too
    for quality in (manifest["quality"], shipped_manifest["quality"]):
        assert 0.1 <= quality["student_avg_at_8"] <= 0.45
        assert quality["teacher_avg_at_8"] >= 0.65
        assert quality["teacher_avg_at_8"] - quality["student_avg_at_8"] >= 0.3
