"""FLOP accounting at the real architecture (meta device: shapes only) against counts worked out by hand from the configs."""

import pytest

from llavaflow.model.sizes import build_reference_llava
from llavaflow.train.flops import FlopModel


@pytest.fixture(scope="module")
def reference():
    return build_reference_llava("meta")


def test_parameter_counts_match_the_spec(reference):
    f = FlopModel.of(reference)
    assert f.llm_matmul_params == pytest.approx(3.72e9, rel=2e-3)  # 3.624B layers + 98.5M lm_head
    assert f.vit_matmul_params == pytest.approx(0.302e9, rel=2e-3)
    assert f.vit_tokens == 577
    assert f.vit_forward() == pytest.approx(0.381e12, rel=5e-3)
    assert sum(p.numel() for p in reference.parameters()) == pytest.approx(4.137e9, rel=1e-3)


def test_sample_flops_match_the_spec(reference):
    reference.set_trainable(["llm", "visual_encoder", "projector"])
    finetune = FlopModel.of(reference)
    for tokens, tflop in [(700, 17.0), (780, 18.9), (900, 21.7)]:
        assert finetune.sample_flops(tokens) / 1e12 == pytest.approx(tflop, abs=0.1)
    reference.set_trainable(["projector"])
    pretrain = FlopModel.of(reference)
    assert 9.6e12 <= pretrain.sample_flops(610) <= 9.7e12
    # A text-only sample runs no ViT work worth counting; packing never changes a sample's count.
    assert finetune.sample_flops(300, images=0) == 6 * finetune.llm_matmul_params * 300 + 6 * 32 * 3072 * 300**2
