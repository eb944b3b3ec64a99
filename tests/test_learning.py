"""PBSD learns: the student picks up what only the privileged teacher knows (a learning test, not a smoke test).

Task: the prompt is a letter ("c?"); the answer is a secret digit, the same for every letter. The privileged context
states it ("c=7"). A short supervised warm start teaches the network to *copy* a digit from the context (with random
digits, so it learns no answer) and to answer a bare prompt with a random digit. So the teacher (same network, with
the context) systematically answers 7 and the student is at chance; only PBSD's teacher samples can teach the
student the answer.
"""

import random

import pytest
import torch
from datasets import Dataset

from pbsd_trl import PBSDConfig, PBSDTrainer
from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model


LETTERS = "abcdefgh"
SECRET = dict.fromkeys(LETTERS, "7")
TEMPLATE = "{prompt} {privileged_context}"


def user(text):
    return [{"role": "user", "content": text}]


def warm_start(model, tokenizer, steps=800, seed=0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    end = tokenizer.eos_token
    for _ in range(steps):
        batch = []
        for _ in range(32):
            letter, digit = rng.choice(LETTERS), str(rng.randrange(10))
            if rng.random() < 0.5:  # teacher format: copy the digit of the context
                prompt = user(TEMPLATE.format(prompt=f"{letter}?", privileged_context=f"{letter}={digit}"))
            else:  # student format: any digit
                prompt = user(f"{letter}?")
            prompt_ids = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            completion_ids = tokenizer(digit + end, add_special_tokens=False)["input_ids"]
            batch.append((prompt_ids, completion_ids))
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            seq = p + c
            ids[i, -len(seq) :] = torch.tensor(seq)
            mask[i, -len(seq) :] = 1
            labels[i, -len(c) :] = torch.tensor(c)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@torch.no_grad()
def answer_logps(model, tokenizer, context: bool):
    """Mean log-prob of the secret digit, and the fraction of letters whose most likely digit is the secret, with
    the student prompt (or the teacher prompt)."""
    digit_ids = tokenizer.convert_tokens_to_ids(list("0123456789"))
    values, hits = [], 0
    for letter, digit in SECRET.items():
        text = (
            TEMPLATE.format(prompt=f"{letter}?", privileged_context=f"{letter}={digit}") if context else f"{letter}?"
        )
        prompt_ids = tokenizer.apply_chat_template(
            user(text), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        logps = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].log_softmax(-1)
        values.append(logps[tokenizer.convert_tokens_to_ids(digit)].item())
        hits += int(digit_ids[logps[digit_ids].argmax().item()] == tokenizer.convert_tokens_to_ids(digit))
    return sum(values) / len(values), hits / len(SECRET)


@pytest.mark.slow
def test_pbsd_teaches_the_student_what_the_teacher_knows(tmp_path):
    tokenizer = build_char_tokenizer()
    model = build_random_model(tokenizer, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    warm_start(model, tokenizer)
    model.eval()
    (teacher_before, teacher_hits), (student_before, _) = (
        answer_logps(model, tokenizer, True),
        answer_logps(model, tokenizer, False),
    )
    assert teacher_hits >= 0.75  # the teacher copies the context ...
    assert student_before < -1.8  # ... the student is near chance (log 1/10 = -2.3)
    assert teacher_before > student_before + 0.5

    rows = [
        {"prompt": user(f"{letter}?"), "privileged_context": f"{letter}={digit}"} for letter, digit in SECRET.items()
    ]
    args = PBSDConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=3,
        max_steps=30,
        learning_rate=3e-3,
        pbsd_beta=0.5,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        teacher_prompt_template=TEMPLATE,
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = PBSDTrainer(model, args=args, train_dataset=Dataset.from_list(rows * 8), processing_class=tokenizer)
    trainer.train()
    model.eval()
    student_after, student_hits = answer_logps(model, tokenizer, False)
    print(
        f"student log p(answer): {student_before:.3f} -> {student_after:.3f} (argmax = secret for "
        f"{student_hits:.0%} of letters); teacher {teacher_before:.3f} ({teacher_hits:.0%})"
    )
    # the student moves most of the way to the teacher, and the secret becomes its answer
    assert student_after > student_before + 0.5
    assert student_after > (student_before + teacher_before) / 2
    assert student_hits >= 0.75
    # the pairwise objective improves: margins climb from strongly negative towards 0 and the loss falls from well
    # above log 2 towards it. (Not preference accuracy: once the student answers like the teacher, most pairs hold two
    # identical samples whose margin is exactly 0, so "margin > 0" reads 0 early and late on some CPUs.)
    history = [entry for entry in trainer.state.log_history if "pbsd/margin" in entry]
    early, late = history[:5], history[-10:]
    mean = lambda entries, key: sum(e[key] for e in entries) / len(entries)  # noqa: E731
    print({f"{key} {when}": round(mean(entries, key), 3) for key in ("loss", "pbsd/margin")
           for when, entries in (("early", early), ("late", late))})  # fmt: skip
    assert mean(late, "pbsd/margin") > mean(early, "pbsd/margin") + 0.5
    assert mean(late, "loss") < mean(early, "loss") - 0.3
    assert mean(early, "loss") > 0.9  # log 2 = 0.69 is the loss of a zero margin
