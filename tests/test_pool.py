"""Teacher-sample pool (`pbsd_trl/pool/`): build, resume, refuse a mismatched pool, and a pool step equal to an online
step.

Then hostile input to the pool, each refused with an error naming the problem before any update: a pool whose stamp
differs from the run (model configuration, precision), a damaged pool, rows the build must refuse before sampling; the
visit counters across a resume; and a build by two processes (gloo), killed and resumed.
"""

import copy
import json
import math
import os
import re
import sys
import time

import pytest
import torch
from datasets import Dataset
from testing_utils import (
    INVISIBLE_CONTEXTS,
    TEMPLATE,
    contains_answer,
    params_snapshot,
    params_unchanged,
    tiny_pbsd_config,
)

from pbsd_trl import PBSDTrainer
from pbsd_trl.pool import (
    POOL_STAMP_FILE,
    TeacherPool,
    TeacherPoolError,
    build_teacher_pool,
    load_teacher_pool,
    row_key,
    teacher_prompt_builder,
    tokenize_prompts,
    weights_fingerprint,
)
from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import build_random_model


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4


def make_args(tmp_path, **kwargs):
    return tiny_pbsd_config(tmp_path / "out", **{"teacher_prompt_template": TEMPLATE, "max_steps": 2, **kwargs})


@pytest.fixture(scope="module")
def dataset():
    return make_math_dataset("train", n=12, seed=0)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_random_model(tokenizer, seed=1)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory, model, tokenizer, dataset):
    path = str(tmp_path_factory.mktemp("pool") / "pool")
    build_teacher_pool(
        copy.deepcopy(model),
        tokenizer,
        dataset,
        path,
        make_args(tmp_path_factory.mktemp("a")),
        K,
        batch_size=16,
        progress=False,
    )
    return path


def reference_logp(model, prompt_ids, completion_ids, temperature=1.0):
    """Plain unpadded forward, float64 log-softmax: the independent reference of a stored teacher log-prob."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).sum().item()


def test_build_resume_after_kill_covers_every_row_once(tmp_path, model, tokenizer, dataset):
    path = str(tmp_path / "pool")
    args = make_args(tmp_path)
    # 16 completions per call = 4 rows per batch: "killed" after the first batch
    assert (
        build_teacher_pool(
            copy.deepcopy(model),
            tokenizer,
            dataset,
            path,
            args,
            K,
            batch_size=16,
            stop_after_batches=1,
            progress=False,
        )
        is None
    )
    with pytest.raises(TeacherPoolError, match="unfinished"):
        load_teacher_pool(path)
    parts = os.listdir(os.path.join(path, "parts"))
    assert len(parts) == 1
    first = __import__("pyarrow.parquet", fromlist=["x"]).read_table(os.path.join(path, "parts", parts[0])).to_pylist()
    assert len(first) == 4
    # a half-written part of a killed process is ignored
    open(os.path.join(path, "parts", ".part-x.parquet.tmp"), "w").write("garbage")

    pool = build_teacher_pool(copy.deepcopy(model), tokenizer, dataset, path, args, K, batch_size=16, progress=False)
    keys = [row_key(p, c) for p, c in zip(dataset["prompt"], dataset["privileged_context"], strict=True)]
    assert sorted(pool["key"]) == sorted(set(keys))  # every distinct row exactly once
    assert len(pool) == len(set(pool["key"]))
    by_key = {row["key"]: row for row in pool}
    for row in first:  # the samples drawn before the kill are kept, not drawn again
        assert by_key[row["key"]]["completion_ids"] == row["completion_ids"]
    assert json.load(open(os.path.join(path, POOL_STAMP_FILE)))["complete"] is True

    # Samples are cut after the first EOS, within the length budget; log-probs match an independent reference
    prompts = teacher_prompt_builder(tokenizer, args)(dataset["prompt"], [dict(r) for r in dataset])[0]
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    eos = tokenizer.eos_token_id
    for i, key in enumerate(keys):
        row = by_key[key]
        assert row["row"] == keys.index(key) and row["teacher_prompt_length"] == len(prompt_ids[i])
        assert len(row["completion_ids"]) == K
        for ids, logp in zip(row["completion_ids"], row["teacher_logps"], strict=True):
            assert 1 <= len(ids) <= args.max_completion_length
            assert eos not in ids[:-1]
            assert logp == pytest.approx(reference_logp(model, prompt_ids[i], ids), rel=1e-4, abs=1e-4)


def test_build_refuses_other_settings_in_the_same_folder(tmp_path, pool_dir, model, tokenizer, dataset):
    with pytest.raises(TeacherPoolError, match="sampling.temperature: pool 1.0, this run 0.7"):
        build_teacher_pool(
            copy.deepcopy(model), tokenizer, dataset, pool_dir, make_args(tmp_path, temperature=0.7), K, progress=False
        )
    with pytest.raises(TeacherPoolError, match=r"num_samples \(K\): pool 4, this build 2"):
        build_teacher_pool(copy.deepcopy(model), tokenizer, dataset, pool_dir, make_args(tmp_path), 2, progress=False)


def test_trainer_refuses_a_mismatched_pool(tmp_path, pool_dir, model, tokenizer, dataset, tiny_trainer):
    def trainer(net=model, data=dataset, **kwargs):
        args = make_args(tmp_path, **{"teacher_pool": pool_dir, **kwargs})
        return tiny_trainer(data, args=args, model=copy.deepcopy(net))

    with pytest.raises(TeacherPoolError, match="teacher_weights \\(the teacher weights differ\\)"):
        trainer(net=build_random_model(tokenizer, seed=2))
    with pytest.raises(TeacherPoolError, match="teacher_prompt_template"):
        trainer(teacher_prompt_template="{prompt} Hint: {privileged_context}")
    with pytest.raises(TeacherPoolError, match="sampling.max_completion_length: pool 8, this run 12"):
        trainer(max_completion_length=12)
    with pytest.raises(TeacherPoolError, match="K=4 samples per row, fewer than `num_teacher_generations`=8"):
        trainer(num_generations=8, per_device_train_batch_size=16)
    with pytest.raises(TeacherPoolError, match="not a teacher pool"):
        trainer(teacher_pool=str(tmp_path))
    with pytest.raises(ValueError, match="`teacher_pool` holds samples of the fixed `base` teacher"):
        make_args(tmp_path, teacher_pool=pool_dir, teacher_model_kind="live")


def test_rows_missing_from_the_pool_sample_the_teacher_online(
    tmp_path, pool_dir, model, tokenizer, dataset, caplog, tiny_trainer
):
    more = make_math_dataset("train", n=14, seed=0)  # rows 12 and 13 are not in the pool
    args = make_args(tmp_path, teacher_pool=pool_dir)
    with caplog.at_level("WARNING"):
        trainer = tiny_trainer(more, args=args, model=copy.deepcopy(model))
    assert "no samples for 2 of the 14 rows of train_dataset" in caplog.text
    calls = []
    original = trainer._generate_single_turn
    trainer._generate_single_turn = lambda ids, *a, **kw: calls.append(len(ids)) or original(ids, *a, **kw)
    trainer.model.train()
    trainer._generate_and_score_completions([dict(more[0])] * 4 + [dict(more[1])] * 4)
    assert calls == [8]  # student only: the teacher's samples came from the pool
    trainer._generate_and_score_completions([dict(more[0])] * 4 + [dict(more[13])] * 4)
    assert calls == [8, 8, 8]  # a row without samples: the teacher is sampled online


def test_pool_serves_a_lora_student_of_the_same_model(tmp_path, pool_dir, model, tokenizer, dataset):
    from peft import LoraConfig

    args = make_args(tmp_path, teacher_pool=pool_dir)
    trainer = PBSDTrainer(
        copy.deepcopy(model),
        contains_answer,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer._teacher_pool is not None


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pairing", ["matched", "all", "union"])
def test_pool_step_equals_online_step_given_the_same_samples(
    tmp_path, pool_dir, model, tokenizer, dataset, pairing, tiny_trainer
):
    """The online trainer's teacher `generate` is replaced by the pool's samples: same loss, same gradients, same
    pair metrics (identical pairs, whose pool margins round to ±1e-5, count in neither accuracy)."""
    pool, _ = load_teacher_pool(pool_dir)
    by_key = {row["key"]: row for row in pool}
    group, num_teacher = 4, (4 if pairing == "matched" else 2)
    rows = [dict(dataset[i]) for i in range(2) for _ in range(group)]
    keys = [row_key(r["prompt"], r["privileged_context"]) for r in rows]
    labels = {"matched": "role", "all": "reward", "union": "soft"}[pairing]
    kwargs = dict(pairing=pairing, num_teacher_generations=num_teacher, pair_labels=labels)

    online = tiny_trainer(dataset, args=make_args(tmp_path, **kwargs), model=copy.deepcopy(model))
    teacher_rows = [i for i in range(len(rows)) if i % group < num_teacher]
    calls = []
    original = online._generate_single_turn

    def generate(prompt_ids, *args, **kw):
        calls.append(len(prompt_ids))
        if len(calls) == 1:
            return original(prompt_ids, *args, **kw)  # the student's samples
        return [by_key[keys[i]]["completion_ids"][i % group] for i in teacher_rows], None

    online._generate_single_turn = generate
    pooled = tiny_trainer(
        dataset, args=make_args(tmp_path, teacher_pool=pool_dir, **kwargs), model=copy.deepcopy(model)
    )
    results = []
    for trainer in (online, pooled):
        trainer.model.train()
        torch.manual_seed(0)
        inputs = trainer._generate_and_score_completions(rows)
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((inputs, loss.detach(), _grads(trainer.model)))
    assert calls == [len(rows), len(teacher_rows)]  # the pool trainer never called generate for the teacher
    (a, loss_a, grads_a), (b, loss_b, grads_b) = results
    assert torch.equal(a["completion_ids"], b["completion_ids"])  # same student samples
    assert torch.equal(a["teacher_completion_ids"], b["teacher_completion_ids"])
    torch.testing.assert_close(
        a["teacher_logps_teacher_samples"], b["teacher_logps_teacher_samples"], rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(a["teacher_logps_student_samples"], b["teacher_logps_student_samples"])
    torch.testing.assert_close(a["pbsd_labels"], b["pbsd_labels"])
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_a.values())
    metrics = [trainer._metrics["train"] for trainer in (online, pooled)]
    for name in ("pbsd/preference_accuracy", "pbsd/identical_frac", "pbsd/tie_frac", "pbsd/margin"):
        assert metrics[0][name] == pytest.approx(metrics[1][name], abs=1e-4, nan_ok=True), name
    assert not math.isnan(metrics[0]["pbsd/identical_frac"][0])


def test_later_visits_take_unused_samples_first(tmp_path, pool_dir, model, tokenizer, dataset, tiny_trainer):
    """G_T=2 of K=4 per visit: visits 1 and 2 of a prompt use all four samples, visit 3 starts over."""
    args = make_args(tmp_path, teacher_pool=pool_dir, pairing="all", num_teacher_generations=2)
    trainer = tiny_trainer(dataset, args=args, model=copy.deepcopy(model))
    pool, _ = load_teacher_pool(pool_dir)
    row = dict(dataset[3])
    index = pool["key"].index(row_key(row["prompt"], row["privileged_context"]))
    samples = [tuple(ids) for ids in pool[index]["completion_ids"]]
    trainer.model.train()
    seen = []
    for _ in range(3):
        inputs = trainer._generate_and_score_completions([row] * 4)
        ids, mask = inputs["teacher_completion_ids"], inputs["teacher_completion_mask"]
        seen.append([tuple(ids[i][mask[i].bool()].tolist()) for i in range(2)])
    assert seen[0] + seen[1] == samples  # samples 0, 1 then 2, 3
    assert seen[2] == seen[0]


def test_default_pool_covers_the_rows_the_run_visits_and_replaces_teacher_generation(
    tmp_path, model, tokenizer, dataset, tiny_trainer
):
    from pbsd_trl.pool import rows_visited, use_default_pool

    args = make_args(tmp_path, max_steps=2)  # 2 steps x 2 prompts: 4 of the 12 rows
    trainer = tiny_trainer(dataset, args=args, model=copy.deepcopy(model))
    visited = rows_visited(trainer, dataset)
    loader_rows = []
    for batch in trainer.get_train_dataloader():  # what training draws: the same rows as predicted
        loader_rows += [row_key(r["prompt"], r["privileged_context"]) for r in batch]
        if len(loader_rows) >= 2 * args.per_device_train_batch_size:
            break
    assert {row_key(dataset[i]["prompt"], dataset[i]["privileged_context"]) for i in visited} == set(loader_rows)
    assert len(visited) == 4
    messages = []
    path = use_default_pool(trainer, dataset, say=messages.append)
    pool, stamp = load_teacher_pool(path)
    assert len(pool) == 4 and stamp["num_samples"] == 4
    assert "K=4 base-teacher samples for each of the 4 distinct prompts" in messages[0]
    calls = []
    original = trainer._generate_single_turn
    trainer._generate_single_turn = lambda ids, *a, **kw: calls.append(len(ids)) or original(ids, *a, **kw)
    trainer.train()
    assert calls == [8, 8]  # two steps, student samples only
    assert use_default_pool(trainer, dataset, say=messages.append) == path  # already set: kept


def test_default_pool_is_not_used_for_a_moving_teacher(tmp_path, model, tokenizer, dataset, tiny_trainer):
    from pbsd_trl.pool import use_default_pool

    trainer = tiny_trainer(dataset, args=make_args(tmp_path, teacher_model_kind="live"), model=copy.deepcopy(model))
    messages = []
    assert use_default_pool(trainer, dataset, say=messages.append) is None
    assert "drawn in every step (teacher_model_kind='live' changes during training)" in messages[0]


def test_default_pool_batch_size_by_device():
    from pbsd_trl.pool import default_pool_batch_size

    assert default_pool_batch_size("cpu") == default_pool_batch_size(torch.device("cuda")) == 256
    assert default_pool_batch_size("cpu", num_samples=300) == 300  # one row's K samples always fit a call


def test_build_prefills_each_rows_prompt_once(tmp_path, model, tokenizer, dataset, monkeypatch):
    """The K samples of a row share one prefill of its teacher prompt, and the stored log-probs stay the teacher's."""
    import pbsd_trl.kernels.shared_prefix as shared_prefix

    calls = []
    original = shared_prefix.generate_with_shared_prefill

    def counting(generate, model, select_rows=None, **kw):
        ids, mask = kw["input_ids"], kw["attention_mask"]
        calls.append((ids.size(0), torch.unique(torch.cat([ids, mask], 1), dim=0).size(0)))
        return original(generate, model, select_rows, **kw)

    monkeypatch.setattr(shared_prefix, "generate_with_shared_prefill", counting)
    rows = dataset.select(range(6))
    pool = build_teacher_pool(
        copy.deepcopy(model), tokenizer, rows, str(tmp_path / "pool"), make_args(tmp_path), K, batch_size=4 * K
    )
    assert sum(n for n, _ in calls) == len(rows) * K and all(n == K * distinct for n, distinct in calls)
    builder = teacher_prompt_builder(tokenizer, make_args(tmp_path))
    for record in pool.select(range(2)):
        row = rows[record["row"]]
        (prompt,), _ = builder([row["prompt"]], [row])
        (prompt_ids,) = tokenize_prompts(tokenizer, [prompt])
        for ids, logp in zip(record["completion_ids"], record["teacher_logps"], strict=True):
            assert logp == pytest.approx(reference_logp(model, prompt_ids, ids), abs=1e-3)


def test_build_command_on_local_files(tmp_path, model, tokenizer, dataset, tiny_trainer):
    """`python -m pbsd_trl.scripts.build_teacher_pool` with a local model folder and a local JSONL file (the loading
    code a real run uses), and a trainer that accepts the pool it wrote."""
    from pbsd_trl.scripts.build_teacher_pool import main

    model_dir, data_file = tmp_path / "model", tmp_path / "train.jsonl"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [dict(dataset[i]) for i in range(3)]
    with open(data_file, "w") as f:
        for row in rows:
            f.write(
                json.dumps({"problem": row["prompt"], "solution": row["privileged_context"], "answer": row["answer"]})
            )
            f.write("\n")
    pool_dir = tmp_path / "pool"
    settings = ["--max_completion_length", "8", "--teacher_prompt_template", TEMPLATE, "--temperature", "1.0"]
    pool = main(
        ["--pool_dir", str(pool_dir), "--num_samples", str(K), "--model_name_or_path", str(model_dir)]
        + ["--dataset_name", str(data_file), "--prompt_column", "problem", "--solution_column", "solution"]
        + ["--output_dir", str(tmp_path / "out")]
        + settings
    )
    assert len(pool) == len(rows) and all(len(ids) == K for ids in pool["completion_ids"])
    from pbsd_trl.recipes.data.loading import load_prompt_dataset

    train = load_prompt_dataset(str(data_file), prompt_column="problem", solution_column="solution", task="math")
    trainer = tiny_trainer(
        train,
        args=make_args(tmp_path, teacher_pool=str(pool_dir), max_completion_length=8),
        model=copy.deepcopy(model),
    )
    assert trainer.args.teacher_pool == str(pool_dir)


def test_build_reads_teacher_logps_off_the_decoding_steps(tmp_path, model, tokenizer, dataset, monkeypatch):
    """In float32 the build takes the teacher's log-probs of its samples from the logits that drew them (no scoring
    pass); they equal a scoring pass over the same samples and an independent float64 forward."""
    import pbsd_trl.pool.build as build

    scored = []
    original = build.sequence_logps
    monkeypatch.setattr(build, "sequence_logps", lambda *a, **kw: scored.append(1) or original(*a, **kw))
    subset = dataset.select(range(4))
    pools = {}
    for setting in (None, False):
        scored.clear()
        path = str(tmp_path / f"pool-{setting}")
        args = make_args(tmp_path, teacher_logps_from_generation=setting, temperature=0.7)
        pools[setting] = build_teacher_pool(copy.deepcopy(model), tokenizer, subset, path, args, K, progress=False)
        assert bool(scored) is (setting is False)
    decoded, rescored = pools[None], pools[False]
    assert decoded["completion_ids"] == rescored["completion_ids"]  # the recording consumes no random numbers
    torch.testing.assert_close(
        torch.tensor(decoded["teacher_logps"]), torch.tensor(rescored["teacher_logps"]), rtol=1e-5, atol=1e-4
    )
    row = decoded[0]
    prompt_ids = tokenize_prompts(
        tokenizer, teacher_prompt_builder(tokenizer, make_args(tmp_path))([subset[0]["prompt"]], [subset[0]])[0]
    )[0]
    assert row["key"] == row_key(subset[0]["prompt"], subset[0]["privileged_context"])
    for completion, logp in zip(row["completion_ids"], row["teacher_logps"], strict=True):
        assert logp == pytest.approx(reference_logp(model, prompt_ids, completion, 0.7), rel=1e-4, abs=1e-4)


# ---- hostile input: fixtures of a 4-row pool, one-step runs -------------------------------------------------------
@pytest.fixture(scope="module")
def small_dataset():
    return make_math_dataset("train", n=4, seed=0)


def one_step_args(tmp_path, output_dir=None, **kwargs):
    kwargs = {"teacher_prompt_template": TEMPLATE, "max_steps": 1, **kwargs}
    return tiny_pbsd_config(output_dir or tmp_path / "out", **kwargs)


@pytest.fixture(scope="module")
def small_pool_dir(tmp_path_factory, model, tokenizer, small_dataset):
    path = str(tmp_path_factory.mktemp("pool") / "pool")
    args = one_step_args(tmp_path_factory.mktemp("a"))
    build_teacher_pool(copy.deepcopy(model), tokenizer, small_dataset, path, args, 4, batch_size=16, progress=False)
    return path


def pool_trainer(tmp_path, net, tokenizer, data, pool, **kwargs):
    args = one_step_args(tmp_path, teacher_pool=pool, **kwargs)
    return PBSDTrainer(net, contains_answer, args=args, train_dataset=data, processing_class=tokenizer)


# ---- the pool's stamp: everything that changes the teacher's log-probs ---------------------------------------------
def test_pool_of_the_same_weights_under_another_rope_scaling_is_refused(
    tmp_path, model, tokenizer, small_dataset, small_pool_dir
):
    """The weights fingerprint skips the rotary buffers: the model configuration must be in the stamp."""
    rope = dict(model.config.rope_parameters, rope_type="linear", factor=4.0)
    other = build_random_model(tokenizer, seed=1, rope_parameters=rope)
    assert weights_fingerprint(other) == weights_fingerprint(model)  # the same weights, other log-probs
    ids = torch.tensor([tokenizer("12+34=46. " * 6)["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, other(ids).logits, atol=1e-3)
    before = params_snapshot(other)
    with pytest.raises(TeacherPoolError, match="model_config \\(the model configuration differs"):
        pool_trainer(tmp_path, other, tokenizer, small_dataset, small_pool_dir)
    assert params_unchanged(before, other)


def test_pool_of_another_precision_is_refused(tmp_path, model, tokenizer, small_dataset, small_pool_dir):
    with pytest.raises(TeacherPoolError, match="mixed_precision: pool 'no', this run 'bf16'"):
        pool_trainer(tmp_path, copy.deepcopy(model), tokenizer, small_dataset, small_pool_dir, bf16=True)
    with pytest.raises(TeacherPoolError, match="dtype: pool 'torch.float32', this run 'torch.bfloat16'"):
        pool_trainer(tmp_path, copy.deepcopy(model).to(torch.bfloat16), tokenizer, small_dataset, small_pool_dir)


def test_pool_build_refuses_fp16(tmp_path, model, tokenizer, small_dataset):
    args = one_step_args(tmp_path)
    args.fp16 = True  # the CPU refuses fp16 at construction: set it as a GPU run would have it
    with pytest.raises(ValueError, match="fp16"):
        build_teacher_pool(
            copy.deepcopy(model), tokenizer, small_dataset, str(tmp_path / "p"), args, 4, progress=False
        )


# ---- the pool's visit counters across a resume ---------------------------------------------------------------------
@pytest.mark.slow
def test_resumed_run_takes_the_pool_samples_of_an_uninterrupted_run(tmp_path, model, tokenizer, monkeypatch):
    """Two prompts, both in every step; K=16 samples, 4 per visit: steps 1-4 take four disjoint quarters."""
    data = make_math_dataset("train", n=2, seed=0)
    pool = str(tmp_path / "pool")
    build_teacher_pool(copy.deepcopy(model), tokenizer, data, pool, one_step_args(tmp_path), 16, progress=False)
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
def test_damaged_pool_is_named_with_the_fix(tmp_path, model, tokenizer, small_dataset, small_pool_dir, name):
    folder, path = _damaged_copy(small_pool_dir, tmp_path, name)
    with pytest.raises(TeacherPoolError) as err:
        pool_trainer(tmp_path, copy.deepcopy(model), tokenizer, small_dataset, folder)
    message = str(err.value)
    assert (path if name == POOL_STAMP_FILE else os.path.join(folder, "data")) in message, message
    assert "damaged or truncated" in message and "Rebuild the pool" in message, message


def test_damaged_pool_part_is_named_when_the_build_resumes(tmp_path, model, tokenizer, small_dataset):
    args, folder = one_step_args(tmp_path), str(tmp_path / "pool")
    build = lambda **kw: build_teacher_pool(  # noqa: E731
        copy.deepcopy(model), tokenizer, small_dataset, folder, args, 4, batch_size=8, progress=False, **kw
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
            copy.deepcopy(model), tokenizer, Dataset.from_list(rows), str(tmp_path / "p"), one_step_args(tmp_path), 4
        )
    assert time.perf_counter() - start < 10
    assert not list((tmp_path / "p" / "parts").glob("*.parquet"))


@pytest.mark.parametrize("context", INVISIBLE_CONTEXTS)
def test_pool_build_refuses_an_invisible_context_before_sampling(tmp_path, model, tokenizer, monkeypatch, context):
    rows = make_math_dataset("train", n=4, seed=0).to_list()
    rows[1]["privileged_context"] = context
    _never_sample(monkeypatch)
    with pytest.raises(ValueError, match="Row 1 has an empty privileged context"):
        build_teacher_pool(
            copy.deepcopy(model), tokenizer, Dataset.from_list(rows), str(tmp_path / "p"), one_step_args(tmp_path), 4
        )


# ---- two-process (gloo) builds: the processes split the rows, a killed build resumes, every row once ---------------
LAUNCH_CONFIG = "examples/accelerate_configs/multi_gpu.yaml"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_build_resumes_and_covers_every_row_once(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
    from launch import accelerate_launch

    pool_dir, report = str(tmp_path / "pool"), str(tmp_path / "report.json")
    # First launch: each process writes one batch (2 rows of K=2) and stops, as if killed
    code, out, _ = accelerate_launch(
        LAUNCH_CONFIG, "run_pool.py", "--pool-dir", pool_dir, "--report", report, "--stop-after-batches", "1"
    )
    assert code == 0, out[-3000:]
    assert json.load(open(report)) == {"world": 2, "complete": False, "keys": None}
    parts = sorted(os.listdir(os.path.join(pool_dir, "parts")))
    assert len(parts) == 2 and any("-r0-" in p for p in parts) and any("-r1-" in p for p in parts), parts

    code, out, _ = accelerate_launch(LAUNCH_CONFIG, "run_pool.py", "--pool-dir", pool_dir, "--report", report)
    assert code == 0, out[-3000:]
    result = json.load(open(report))
    dataset = make_math_dataset("train", n=12, seed=0)
    expected = {row_key(p, c) for p, c in zip(dataset["prompt"], dataset["privileged_context"], strict=True)}
    assert result["complete"] and result["world"] == 2
    assert sorted(result["keys"]) == sorted(expected) and len(result["keys"]) == len(expected)
    parts = os.listdir(os.path.join(pool_dir, "parts"))
    # 12 rows, 2 per batch: 6 batches in all, the 2 of the first launch kept
    assert len([p for p in parts if p.endswith(".parquet")]) == 6
