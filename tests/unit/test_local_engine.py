"""The embedded engine: batched, left-padded generation equals one-by-one transformers, with log-probs."""

import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import tiny_qwen2

from real_megatron.rollout.local import LocalEngine
from real_megatron.rollout.types import SamplingParams


@pytest.fixture(scope="module")
def reference():
    return tiny_qwen2(97, layers=2, heads=4, kv_heads=2, positions=128, tie_word_embeddings=True)


def test_greedy_batch_equals_one_by_one_and_logprobs_are_the_models(reference):
    engine = LocalEngine(reference.config, pad_token_id=0)
    engine.update_weights(reference.state_dict().items(), version=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(96,))
    groups = engine.generate(prompts, n=2, params=params)
    assert [len(g) for g in groups] == [2, 2, 2]
    for p, group in zip(prompts, groups):
        with torch.no_grad():
            alone = reference.generate(
                torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=96, pad_token_id=0
            )[0, len(p) :].tolist()
        if 96 in alone:
            alone = alone[: alone.index(96) + 1]
        for sample in group:
            assert sample.output_ids == alone and sample.weight_version == 3
            assert sample.finish_reason == ("stop" if alone[-1] == 96 else "length")
            with torch.no_grad():
                logits = reference(torch.tensor([p + sample.output_ids])).logits[0, len(p) - 1 : -1]
            expect = (
                torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(sample.output_ids)[:, None]).squeeze(1)
            )
            assert torch.allclose(torch.tensor(sample.logprobs), expect, atol=1e-5)


def test_sampling_is_seeded_and_weights_matter(reference):
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    a = LocalEngine(reference.config, seed=1)
    a.update_weights(reference.state_dict().items(), 1)
    b = LocalEngine(reference.config, seed=1)
    b.update_weights(reference.state_dict().items(), 1)
    out_a = [s.output_ids for g in a.generate([[1, 2, 3]], 4, params) for s in g]
    assert out_a == [s.output_ids for g in b.generate([[1, 2, 3]], 4, params) for s in g]
    assert len({tuple(x) for x in out_a}) > 1  # 4 samples differ
    torch.manual_seed(1)
    other = transformers.Qwen2ForCausalLM(reference.config).eval()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = a.generate([[1, 2, 3]], 1, greedy)[0][0]
    a.update_weights(other.state_dict().items(), 2)
    after = a.generate([[1, 2, 3]], 1, greedy)[0][0]
    with torch.no_grad():
        expect = other.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False, pad_token_id=0)[
            0, 3:
        ].tolist()
    assert after.weight_version == 2 and after.output_ids == expect and after.logprobs != before.logprobs


def test_incomplete_or_foreign_updates_are_refused(reference):
    engine = LocalEngine(reference.config)
    state = dict(reference.state_dict())
    with pytest.raises(KeyError, match="not a parameter"):
        engine.update_weights([("model.nope.weight", torch.zeros(1))], 1)
    state.pop("model.norm.weight")
    with pytest.raises(KeyError, match="lacks 1 tensors"):
        engine.update_weights(state.items(), 1)


def test_an_moe_model_takes_the_exports_per_expert_tensors_into_its_stacked_experts(tmp_path):
    """The streaming export names each expert's projections as the checkpoint files do; transformers
    keeps one stacked tensor per layer: after the update the engine's logits are exactly those of the
    model loaded from that checkpoint, and an update missing one expert's tensor is refused by name."""
    from moe_models import make_moe_checkpoint
    from safetensors.torch import load_file

    start, target = make_moe_checkpoint(tmp_path / "a", seed=0), make_moe_checkpoint(tmp_path / "b", seed=1)
    engine = LocalEngine(model=transformers.AutoModelForCausalLM.from_pretrained(start).eval())
    exported = load_file(target / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in exported
    engine.update_weights(exported.items(), 1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(target).eval()(ids).logits
        assert torch.equal(engine.model(ids).logits, expected)
    with pytest.raises(
        KeyError, match=r"lacks 1 tensors, e.g. \['model.layers.1.mlp.experts.gate_up_proj \(expert slices\)'\]"
    ):
        engine.update_weights(
            [(k, v) for k, v in exported.items() if k != "model.layers.1.mlp.experts.2.up_proj.weight"], 2
        )


def test_loading_a_checkpoint_prints_no_dtype_deprecation(tmp_path):
    """transformers >= 4.56 warns "`torch_dtype` is deprecated" on every load given that name (a
    fresh process: transformers' logger writes to the stderr it found at import)."""
    config = transformers.AutoConfig.for_model(
        "qwen2",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=50,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    code = (
        "import torch; from real_megatron.rollout.local import LocalEngine; "
        f"e = LocalEngine.from_pretrained({str(tmp_path)!r}, dtype=torch.bfloat16); "
        "assert next(e.model.parameters()).dtype == torch.bfloat16"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch_dtype" not in out.stdout + out.stderr, out.stderr
