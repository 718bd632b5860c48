"""Kernels, one process: Triton (interpreted here) vs torch vs float64, values and gradients."""

import pytest
import torch
from kernel_reference import naive_logprobs, rel_err

from real_megatron.kernels import group_logsumexp, linear_token_logprobs, segment_sum, token_logprobs

IMPLS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SHAPES = [(1, 7), (5, 1000), (33, 1500), (9, 2049)]  # T=1; V below, between and above BLOCK_V=1024


def fresh_inputs(seed, T, V, dtype, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, V, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen)
    return logits, targets, torch.randn(T, generator=gen), torch.randn(T, generator=gen)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,V", SHAPES)
def test_token_logprobs_against_float64(impl, dtype, T, V):
    logits, targets, g_lp, g_ent = fresh_inputs(hash((T, V)) % 1000, T, V, dtype)
    x = logits.clone().requires_grad_(True)
    lp, ent = token_logprobs(x, targets, return_entropy=True, impl=impl)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == (T,)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), x)
    assert grad.dtype == dtype

    ref_x = logits.double().requires_grad_(True)
    ref_lp, ref_ent = naive_logprobs(ref_x, targets)
    (ref_grad,) = torch.autograd.grad((ref_lp * g_lp.double()).sum() + (ref_ent * g_ent.double()).sum(), ref_x)
    tol = TOL[dtype]
    assert rel_err(lp, ref_lp) <= tol
    assert rel_err(ent, ref_ent) <= tol
    assert rel_err(grad, ref_grad) <= tol


@pytest.mark.parametrize("T,V", SHAPES)
def test_triton_matches_torch_and_logprob_only_gradient(T, V):
    logits, targets, g_lp, _ = fresh_inputs(7 + T, T, V, torch.float32)
    out = {}
    for impl in IMPLS:
        x = logits.clone().requires_grad_(True)
        lp = token_logprobs(x, targets, impl=impl)
        (grad,) = torch.autograd.grad((lp * g_lp).sum(), x)
        out[impl] = (lp, grad)
    assert rel_err(out["triton"][0], out["torch"][0]) <= 1e-6
    assert rel_err(out["triton"][1], out["torch"][1]) <= 1e-6
    # the closed form: d lp_t / d x_tv = 1[v = y_t] - softmax_v
    p = torch.softmax(logits.double(), -1)
    expect = (torch.nn.functional.one_hot(targets, V).double() - p) * g_lp.double()[:, None]
    assert rel_err(out["torch"][1], expect) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk,tile", [(1, None), (5, None), (None, None), (5, 100), (None, 1000)])
def test_linear_token_logprobs_against_float64(impl, dtype, chunk, tile, monkeypatch):
    if tile:  # small tiles: many vocabulary blocks per token chunk, as at full scale
        monkeypatch.setattr("real_megatron.kernels.linear_logprobs.CHUNK_LOGITS", tile)
    gen = torch.Generator().manual_seed(3)
    T, H, V = 13, 24, 1100
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.5).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen)
    g_lp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = linear_token_logprobs(h, w, targets, chunk_tokens=chunk, return_entropy=True, impl=impl)
    gh, gw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, w))
    assert gh.dtype == dtype and gw.dtype == dtype

    # float64 math from the logits as the output layer defines them (a matmul in the input dtype)
    logits = (hidden @ weight.t()).double().requires_grad_(True)
    ref_lp, ref_ent = naive_logprobs(logits, targets)
    (g_logits,) = torch.autograd.grad((ref_lp * g_lp.double()).sum() + (ref_ent * g_ent.double()).sum(), logits)
    rgh, rgw = g_logits @ weight.double(), g_logits.t() @ hidden.double()
    tol = TOL[dtype]
    for got, ref in ((lp, ref_lp), (ent, ref_ent), (gh, rgh), (gw, rgw)):
        assert rel_err(got, ref) <= tol


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_divides_the_rounded_logits_in_float32(impl, dtype, monkeypatch):
    """scale = 1/T multiplies the logits as the model's dtype rounds them, in float32 (the engines'
    order), not the 16-bit hidden states; values and gradients against float64 on those logits."""
    monkeypatch.setattr("real_megatron.kernels.linear_logprobs.CHUNK_LOGITS", 500)  # several vocabulary blocks
    gen = torch.Generator().manual_seed(5)
    T, H, V, temperature = 11, 32, 1200, 0.6
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.5).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen)
    g_lp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = linear_token_logprobs(
        h, w, targets, chunk_tokens=4, return_entropy=True, impl=impl, scale=1 / temperature
    )
    gh, gw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, w))

    rounded = (hidden @ weight.t()).double().requires_grad_(True)
    ref_lp, ref_ent = naive_logprobs(rounded / temperature, targets)
    (g_logits,) = torch.autograd.grad((ref_lp * g_lp.double()).sum() + (ref_ent * g_ent.double()).sum(), rounded)
    rgh, rgw = g_logits @ weight.double(), g_logits.t() @ hidden.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(lp, ref_lp) <= (1e-5 if dtype == torch.float32 else 2e-5)  # only float32 rounding after the GEMM
    for got, ref in ((ent, ref_ent), (gh, rgh), (gw, rgw)):
        assert rel_err(got, ref) <= tol
    if dtype == torch.bfloat16:  # dividing the bf16 hidden states instead adds a rounding: visibly worse
        old = linear_token_logprobs((hidden / temperature).to(dtype), weight, targets, impl=impl)
        assert rel_err(old, ref_lp) > 3 * rel_err(lp, ref_lp)


def test_linear_equals_token_logprobs_on_materialised_logits():
    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(10, 8, generator=gen), torch.randn(300, 8, generator=gen)
    targets = torch.randint(0, 300, (10,), generator=gen)
    a = linear_token_logprobs(hidden, weight, targets, chunk_tokens=3, impl="torch")
    b = token_logprobs(hidden @ weight.t(), targets, impl="torch")
    assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocabulary_columns(impl):
    """-inf logits (e.g. vocabulary padding for TP) are exactly absent: no NaN, zero gradient."""
    logits, targets, g_lp, g_ent = fresh_inputs(9, 6, 300, torch.float32)
    padded = torch.cat([logits, torch.full((6, 20), float("-inf"))], dim=1).requires_grad_(True)
    lp, ent = token_logprobs(padded, targets, return_entropy=True, impl=impl)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), padded)
    ref_lp, ref_ent = naive_logprobs(logits, targets)
    assert rel_err(lp, ref_lp) <= 1e-5 and rel_err(ent, ref_ent) <= 1e-5
    assert torch.isfinite(grad).all() and (grad[:, 300:] == 0).all()


def test_gradients_only_where_asked():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen)  # frozen output layer
    lp = linear_token_logprobs(hidden, weight, torch.tensor([1, 2, 3, 49]), impl="torch")
    lp.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    # entropy alone drives a gradient too
    x = torch.randn(3, 20, generator=gen, requires_grad=True)
    _, ent = token_logprobs(x, torch.tensor([0, 5, 19]), return_entropy=True)
    ent.sum().backward()
    p = torch.softmax(x.detach().double(), -1)
    logp = p.log()
    expect = -p * (logp + (-(p * logp).sum(-1, keepdim=True)))  # dH/dx = -p (log p + H)
    assert rel_err(x.grad, expect) <= 1e-5


def float64_group_lse(values, index, num_groups):
    out = torch.full((num_groups,), float("-inf"), dtype=torch.float64)
    for g in range(num_groups):
        sel = values[index == g]
        if len(sel):
            out[g] = torch.logsumexp(sel.double(), 0)
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_group_logsumexp_with_empty_groups(impl):
    gen = torch.Generator().manual_seed(6)
    n, G = 300, 40
    values = (torch.randn(n, generator=gen) * 30).requires_grad_(True)
    index = torch.randint(0, G - 5, (n,), generator=gen)  # groups G-5.. are empty
    lse = group_logsumexp(values, index, G, impl=impl)
    ref = float64_group_lse(values.detach(), index, G)
    assert torch.isinf(lse[G - 5 :]).all() and (lse[G - 5 :] < 0).all()
    assert rel_err(lse[: G - 5], ref[: G - 5]) <= 1e-6
    upstream = torch.randn(G, generator=gen)
    (grad,) = torch.autograd.grad((lse * upstream).sum(), values)
    expect = torch.exp(values.detach().double() - ref[index]) * upstream.double()[index]
    assert torch.isfinite(grad).all() and rel_err(grad, expect) <= 1e-5


def test_group_logsumexp_float64_gradcheck_and_minus_inf_members():
    values = torch.randn(12, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 0, 1, 3, 3, 3, 0, 1, 4, 4, 0, 3])
    nonempty = [0, 1, 3, 4]  # groups 2 and 5 are empty: -inf, outside what finite differences can check
    assert torch.autograd.gradcheck(lambda v: group_logsumexp(v, index, 6, impl="torch")[nonempty], (values,))
    masked = torch.tensor([float("-inf"), 1.0, float("-inf")], requires_grad=True)
    lse = group_logsumexp(masked, torch.tensor([0, 1, 2]), 3, impl="torch")
    torch.logaddexp(lse, torch.zeros(3)).sum().backward()  # REAL adds the anchor like this
    assert torch.isinf(lse[0]) and lse[1].item() == pytest.approx(1.0)
    assert torch.isfinite(masked.grad).all() and masked.grad[0] == 0 and masked.grad[2] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_sum(impl):
    gen = torch.Generator().manual_seed(8)
    values = torch.randn(1000, generator=gen, requires_grad=True)
    index = torch.randint(0, 17, (1000,), generator=gen)
    out = segment_sum(values, index, 20, impl=impl)
    expect = torch.zeros(20, dtype=torch.float64).index_add(0, index, values.detach().double())
    assert rel_err(out, expect) <= 1e-6 and out[17:].abs().max() == 0
    (grad,) = torch.autograd.grad((out * torch.arange(20.0)).sum(), values)
    assert torch.equal(grad, index.float())


def test_bad_inputs_are_named(monkeypatch):
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"target id 10 at position 1 is outside the vocabulary \[0, 10\)"):
        token_logprobs(x, torch.tensor([0, 10, 2]))
    with pytest.raises(ValueError, match="impl must be one of"):
        token_logprobs(x, torch.tensor([0, 1, 2]), impl="cuda")
    with pytest.raises(ValueError, match=r"weight \[V_local, H\]"):
        linear_token_logprobs(torch.randn(3, 4), torch.randn(10, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 2\)"):
        group_logsumexp(torch.randn(3), torch.tensor([0, 1, 2]), 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        token_logprobs(x, torch.tensor([0, 1, 2]), impl="triton")
    # auto never picks Triton for CPU tensors
    assert token_logprobs(x, torch.tensor([0, 1, 2])).shape == (3,)
