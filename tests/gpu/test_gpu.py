"""The compiled Triton kernels on a GPU against the torch reference (the GPU check's item (a)).

Runs with `pytest -m gpu` on a machine with CUDA (tools/gpu_check.sh). With REAL_MEGATRON_GPU_DRY_RUN=1
the same checks run on CPU at small sizes through Triton's interpreter (tools/gpu_check.sh
--cpu-dry-run); otherwise they are skipped where there is no GPU.
"""

import os

import pytest
import torch

from real_megatron.kernels import group_logsumexp, linear_token_logprobs, token_logprobs

DRY = os.environ.get("REAL_MEGATRON_GPU_DRY_RUN") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or DRY), reason="needs CUDA (or REAL_MEGATRON_GPU_DRY_RUN=1)"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_forward_backward_entropy_and_masked_columns(dtype):
    T, V = (64, 1000) if DRY else (2048, 151936)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(T, V, device=DEVICE, generator=gen) * 3).to(dtype)
    logits[:, V - 37 :] = float("-inf")  # vocabulary padding columns
    targets = torch.randint(0, V - 37, (T,), device=DEVICE, generator=gen)
    out = {}
    for impl in ("triton", "torch"):
        x = logits.clone().requires_grad_(True)
        lp, ent = token_logprobs(x, targets, return_entropy=True, impl=impl)
        (lp.float().sum() + 0.1 * ent.float().sum()).backward()
        out[impl] = (lp, ent, x.grad)
    for a, b in zip(out["triton"], out["torch"]):
        assert torch.isfinite(a.float()).all()
        assert rel(a, b) <= TOL[dtype]
    assert (out["triton"][2][:, V - 37 :] == 0).all()


def test_token_logprobs_beyond_2_pow_31_elements():
    T, V = (8, 1000) if DRY else (16384, 151936)  # 2.49e9 logits on a GPU: 32-bit offsets would wrap
    assert DRY or T * V > 2**31
    logits = torch.randn(T, V, device=DEVICE, dtype=torch.bfloat16)
    targets = torch.randint(0, V, (T,), device=DEVICE)
    lp = token_logprobs(logits, targets, impl="triton")
    last = slice(T - 4, T)  # the rows past the 2^31st element, against the reference on those rows
    expect = token_logprobs(logits[last].float(), targets[last], impl="torch")
    assert rel(lp[last], expect) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_output_layer(dtype):
    T, H, V = (48, 32, 500) if DRY else (4096, 1536, 151936)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    hidden = (torch.randn(T, H, device=DEVICE, generator=gen)).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE, generator=gen) * 0.02).to(dtype)
    targets = torch.randint(0, V, (T,), device=DEVICE, generator=gen)
    out = {}
    for impl in ("triton", "torch"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, ent = linear_token_logprobs(h, w, targets, return_entropy=True, impl=impl)
        (lp.float().sum() + 0.1 * ent.float().sum()).backward()
        out[impl] = (lp, ent, h.grad, w.grad)
    for a, b in zip(out["triton"], out["torch"]):
        assert rel(a, b) <= TOL[dtype]


def test_group_logsumexp_with_empty_groups():
    values = torch.randn(40, device=DEVICE, dtype=torch.float32, requires_grad=True)
    groups = torch.randint(0, 5, (40,), device=DEVICE) * 2  # odd groups stay empty
    res = {}
    for impl in ("triton", "torch"):
        v = values.detach().clone().requires_grad_(True)
        out = group_logsumexp(v, groups, 10, impl=impl)
        out[torch.isfinite(out)].sum().backward()
        res[impl] = (out, v.grad)
    assert torch.equal(torch.isinf(res["triton"][0]), torch.isinf(res["torch"][0]))
    finite = torch.isfinite(res["torch"][0])
    assert rel(res["triton"][0][finite], res["torch"][0][finite]) <= 1e-6
    assert rel(res["triton"][1], res["torch"][1]) <= 1e-6
