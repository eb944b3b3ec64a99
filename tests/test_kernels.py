import pytest
import torch

from pbsd_trl.kernels import fused_logprob_gap, fused_logprobs, reference_logprob_gap, reference_logprobs


# Tiny tiles that divide neither the token count nor the vocabulary, so both tilings and their remainders run
TINY_TILES = {"token_chunk_size": 5, "vocab_chunk_size": 7}


def make_inputs(B=3, T=6, H=16, V=37, dtype=torch.float32, seed=0, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    teacher = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    if ignore:
        labels[0, :2] = -100
        labels[-1, -1] = -100
    return student, teacher, weight, labels


def as_float64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def combined_loss(outputs, seed=1):
    # Gradients reach both through the per-token log-probs and through the per-sequence gap
    student_logps, _, gap = outputs
    gen = torch.Generator().manual_seed(seed)
    token_w = torch.randn(student_logps.shape, generator=gen, dtype=torch.float64).to(student_logps)
    seq_w = torch.randn(gap.shape, generator=gen, dtype=torch.float64).to(gap)
    return (student_logps * token_w).sum() + (gap * seq_w).sum()


def assert_grads_close(actual, expected, rtol):
    scale = expected.abs().max().clamp(min=1e-12)
    assert (actual.double() - expected).abs().max() / scale < rtol


def assert_matches_reference(student, teacher, weight, labels, tol, *, bias=None, compared=3, tiles=None, **options):
    """The fused kernel against the float64 reference on the same inputs and `options` (temperature, softcap, ...):
    float32 outputs (the first `compared` of them) within `tol`, and gradients of the student's hidden states, the
    head's weight and bias within `tol` relative. Returns `(out, ref)`."""
    out = fused_logprob_gap(student, teacher, weight, labels, bias=bias, **(tiles or {}), **options)
    ref_student, ref_teacher, ref_weight = as_float64(student, teacher, weight)
    ref_bias = None if bias is None else as_float64(bias)[0]
    ref = reference_logprob_gap(ref_student, ref_teacher, ref_weight, labels, bias=ref_bias, **options)
    for actual, expected in zip(out[:compared], ref[:compared], strict=True):
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual.double(), expected.detach(), atol=tol, rtol=0)
    combined_loss(out).backward()
    combined_loss(ref).backward()
    pairs = [(student, ref_student), (weight, ref_weight)] + ([(bias, ref_bias)] if bias is not None else [])
    for actual, expected in pairs:
        assert_grads_close(actual.grad, expected.grad, tol)
    return out, ref


@pytest.mark.parametrize("tiles", [{}, TINY_TILES, {"token_chunk_size": 1, "vocab_chunk_size": 1}])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_float64_reference(tiles, temperature):
    student, teacher, weight, labels = make_inputs()
    assert_matches_reference(student, teacher, weight, labels, 1e-4, tiles=tiles, temperature=temperature)


def test_gradcheck_float64():
    student, teacher, weight, labels = make_inputs(B=2, T=5, H=6, V=11, dtype=torch.float64)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)

    def fn(student, weight, bias):
        student_logps, teacher_logps, gap = fused_logprob_gap(
            student, teacher, weight, labels, temperature=0.8, bias=bias, token_chunk_size=3, vocab_chunk_size=4
        )
        # The teacher path is stop-gradient, but a perturbed head also moves `teacher_logps`: adding them back makes
        # the numerical Jacobian of `gap` the student-path one that the backward returns
        return student_logps, gap + teacher_logps.sum(-1)

    assert torch.autograd.gradcheck(fn, (student, weight, bias))


def test_bias_matches_reference():
    student, teacher, weight, labels = make_inputs()
    bias = torch.randn(weight.shape[0], requires_grad=True)
    assert_matches_reference(student, teacher, weight, labels, 1e-4, bias=bias, tiles=TINY_TILES, temperature=1.3)


def test_teacher_gets_no_gradient():
    student, teacher, weight, labels = make_inputs()
    teacher.requires_grad_()
    student_logps, teacher_logps, gap = fused_logprob_gap(student, teacher, weight, labels)
    assert not teacher_logps.requires_grad
    (student_logps.sum() + gap.sum()).backward()
    assert teacher.grad is None
    assert student.grad is not None and weight.grad is not None


def test_ignored_positions_are_zero_and_inert():
    student, teacher, weight, labels = make_inputs()
    student_logps, teacher_logps, gap = fused_logprob_gap(student, teacher, weight, labels, **TINY_TILES)
    ignored = labels == -100
    assert (student_logps[ignored] == 0).all() and (teacher_logps[ignored] == 0).all()
    torch.testing.assert_close(gap, (student_logps - teacher_logps).sum(-1))
    # Garbage in the hidden states of ignored positions changes nothing and gets zero gradient
    combined_loss((student_logps, teacher_logps, gap)).backward()
    grad_student, grad_weight = student.grad.clone(), weight.grad.clone()
    assert (grad_student[ignored] == 0).all()

    noisy_student = student.detach().clone()
    noisy_student[ignored] = 1e4
    noisy_teacher = teacher.clone()
    noisy_teacher[ignored] = float("nan")
    noisy_student.requires_grad_()
    weight.grad = None
    out = fused_logprob_gap(noisy_student, noisy_teacher, weight, labels, **TINY_TILES)
    torch.testing.assert_close(out[0], student_logps)
    torch.testing.assert_close(out[1], teacher_logps)
    combined_loss(out).backward()
    torch.testing.assert_close(noisy_student.grad, grad_student)
    torch.testing.assert_close(weight.grad, grad_weight)


def test_bf16_inputs():
    student, teacher, weight, labels = make_inputs(dtype=torch.bfloat16)
    assert_matches_reference(student, teacher, weight, labels, 2e-2, compared=2, tiles=TINY_TILES, temperature=0.9)
    assert student.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_matches_float64_reference(dtype, atol):
    # Model-sized shapes with the CUDA default tiles (the CPU tests use tiny ones), against float64 on the same device
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = make_inputs(B=4, T=300, H=512, V=32_771, dtype=dtype)
    student, teacher, weight, labels = (t.detach().cuda() for t in inputs)
    # Scaled like a trained head (logits of a few units): with unit weights the logits reach ~100 and fp32 GEMM
    # rounding alone (cuBLAS's order, ~1e-6 relative) exceeds 1e-4 absolute, whatever the kernel does
    student.requires_grad_()
    weight = (weight / 512**0.5).to(dtype).requires_grad_()
    out, _ = assert_matches_reference(student, teacher, weight, labels, atol, compared=2, temperature=0.8)
    assert all(t.is_cuda for t in out)
    assert teacher.grad is None and student.grad.dtype == dtype and weight.grad.dtype == dtype


@pytest.mark.parametrize("with_bias", [False, True])
def test_low_precision_gemm_path(monkeypatch, with_bias):
    # The path accelerators take (bf16 GEMMs into fp32 statistics), forced on CPU so that CI covers it
    import pbsd_trl.kernels.logprob_kernel as op

    monkeypatch.setattr(op, "_compute_dtype", lambda dtype, device: dtype)
    student, teacher, weight, labels = make_inputs(dtype=torch.bfloat16)
    bias = (torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(3)) / 4).to(torch.bfloat16)
    bias = bias.requires_grad_() if with_bias else None
    assert_matches_reference(
        student, teacher, weight, labels, 2e-2, bias=bias, compared=2, tiles=TINY_TILES, temperature=0.9
    )


def test_tied_embedding_weights():
    # The head weight also embeds the inputs: its gradient is the sum of both uses
    torch.manual_seed(0)
    V, H, B, T = 29, 8, 2, 7
    embedding = torch.nn.Embedding(V, H)
    proj = torch.nn.Linear(H, H)
    ids = torch.randint(0, V, (B, T))
    teacher_ids = torch.randint(0, V, (B, T))
    labels = torch.randint(0, V, (B, T))
    labels[1, :3] = -100

    def grads(op, dtype):
        emb, lin = embedding.to(dtype), proj.to(dtype)
        for p in (*emb.parameters(), *lin.parameters()):
            p.grad = None
        student = torch.tanh(lin(emb(ids)))
        with torch.no_grad():
            teacher = torch.tanh(lin(emb(teacher_ids)))
        tiles = {} if op is reference_logprob_gap else TINY_TILES
        combined_loss(op(student, teacher, emb.weight, labels, **tiles)).backward()
        return emb.weight.grad.clone(), lin.weight.grad.clone()

    expected = grads(reference_logprob_gap, torch.float64)
    actual = grads(fused_logprob_gap, torch.float32)
    for a, e in zip(actual, expected, strict=False):
        assert_grads_close(a, e, 1e-4)


def test_fused_logprobs_single_path():
    student, _, weight, labels = make_inputs()
    bias = torch.randn(weight.shape[0], requires_grad=True)
    logps = fused_logprobs(student, weight, labels, temperature=0.6, bias=bias, **TINY_TILES)
    ref_student, ref_weight, ref_bias = as_float64(student, weight, bias)
    ref = reference_logprobs(ref_student, ref_weight, labels, temperature=0.6, bias=ref_bias)
    torch.testing.assert_close(logps.double(), ref.detach(), atol=1e-4, rtol=0)
    w = torch.randn(labels.shape)
    (logps * w).sum().backward()
    (ref * w.double()).sum().backward()
    for actual, expected in ((student, ref_student), (weight, ref_weight), (bias, ref_bias)):
        assert_grads_close(actual.grad, expected.grad, 1e-4)


def test_only_one_output_used():
    # The outputs whose gradient is not requested reach the backward as None
    student, teacher, weight, labels = make_inputs()
    ref_student, ref_teacher, ref_weight = as_float64(student, teacher, weight)
    fused_logprob_gap(student, teacher, weight, labels, **TINY_TILES)[2].sum().backward()
    reference_logprob_gap(ref_student, ref_teacher, ref_weight, labels)[2].sum().backward()
    assert_grads_close(student.grad, ref_student.grad, 1e-4)
    assert_grads_close(weight.grad, ref_weight.grad, 1e-4)


def test_all_ignored_batch():
    student, teacher, weight, labels = make_inputs()
    labels.fill_(-100)
    student_logps, teacher_logps, gap = fused_logprob_gap(student, teacher, weight, labels)
    assert (student_logps == 0).all() and (teacher_logps == 0).all() and (gap == 0).all()
    # Still connected to the graph, with zero gradients
    combined_loss((student_logps, teacher_logps, gap)).backward()
    assert (student.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("tiles", [{}, TINY_TILES])
def test_single_token(tiles):
    student, teacher, weight, labels = make_inputs(B=1, T=1, ignore=False)
    out, ref = assert_matches_reference(student, teacher, weight, labels, 1e-4, tiles=tiles)
    assert [t.shape for t in out] == [t.shape for t in ref]


def test_rejects_bad_shapes():
    student, teacher, weight, labels = make_inputs()
    with pytest.raises(ValueError):
        fused_logprob_gap(student, teacher, weight[:, :-1], labels)
    with pytest.raises(ValueError):
        fused_logprob_gap(student, teacher, weight, labels[:, :-1])


# ---- logit soft-capping and scaling (Gemma-2, Cohere): the kernel applies what TRL's fused head applies ----------
@pytest.mark.parametrize("tiles", [{}, TINY_TILES])
@pytest.mark.parametrize("softcap, logit_scale", [(5.0, 1.0), (3.0, 0.7), (None, 0.7)])
def test_softcap_and_scale_match_float64_reference(tiles, softcap, logit_scale):
    student, teacher, weight, labels = make_inputs()
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(5), requires_grad=True)
    transform = {"softcap": softcap, "logit_scale": logit_scale}
    _, ref = assert_matches_reference(
        student, teacher, weight, labels, 1e-4, bias=bias, tiles=tiles, temperature=0.8, **transform
    )
    plain = reference_logprob_gap(
        *as_float64(student, teacher, weight), labels, temperature=0.8, bias=bias.detach().double()
    )
    # logits of a few units against a cap of 3-5: the transform changes the log-probs, so the comparison has teeth
    assert (ref[0] - plain[0]).abs().max() > 0.1


def test_softcap_gradcheck_float64():
    student, teacher, weight, labels = make_inputs(B=2, T=5, H=6, V=11, dtype=torch.float64)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)

    def fn(student, weight, bias):
        student_logps, teacher_logps, gap = fused_logprob_gap(
            student,
            teacher,
            weight,
            labels,
            temperature=0.8,
            bias=bias,
            token_chunk_size=3,
            vocab_chunk_size=4,
            softcap=2.0,
            logit_scale=0.9,
        )
        return student_logps, gap + teacher_logps.sum(-1)

    assert torch.autograd.gradcheck(fn, (student, weight, bias))


def test_softcap_low_precision_gemm_path(monkeypatch):
    import pbsd_trl.kernels.logprob_kernel as op

    monkeypatch.setattr(op, "_compute_dtype", lambda dtype, device: dtype)
    student, teacher, weight, labels = make_inputs(dtype=torch.bfloat16)
    assert_matches_reference(
        student, teacher, weight, labels, 2e-2, compared=2, tiles=TINY_TILES, temperature=0.9, softcap=4.0
    )
