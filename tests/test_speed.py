"""Training speed techniques change the speed, not the math: packing with per-sample attention, the fused
linear + cross-entropy loss, selective activation checkpointing, fused AdamW. Each is compared with the
plain path on the tiny model (fp32 on CPU) for loss and gradients."""

import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from llavaflow.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llavaflow.model.build import build_llava
from llavaflow.model.loss import fused_linear_cross_entropy
from llavaflow.model.packing import _block_causal_sdpa, pack_rows


@pytest.fixture(scope="module")
def base(tiny):
    torch.manual_seed(0)
    model = build_llava(str(tiny["llm"]), str(tiny["vit"]))
    # Perturb away from the tiny preset's init so every weight matters for the comparison.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.train()


def ragged_batch(model, lengths=(40, 23, 31), seed=0):
    """Right-padded samples of different lengths: image placeholder after a prompt, answers labelled."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 300, (n,), generator=g)
        ids[i, 0], ids[i, 2] = 1, IMAGE_TOKEN_INDEX
        labels[i, n // 2 : n] = ids[i, n // 2 : n]
        mask[i, :n] = True
    size = model.visual_encoder.config.image_size
    pixels = torch.randn((len(lengths), 3, size, size), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-4, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


def test_packing_gives_the_padded_batch_loss_and_gradients(base):
    batch = ragged_batch(base)
    plain = loss_and_grads(base, batch)
    packed_model = copy.deepcopy(base)
    packed_model.enable_packing()
    assert_same(plain, loss_and_grads(packed_model, batch))


def test_packed_samples_do_not_attend_to_each_other(base):
    """Changing one sample's tokens leaves the other samples' logits in the pack untouched."""
    model = copy.deepcopy(base).eval()
    model.enable_packing()
    batch = ragged_batch(model, lengths=(30, 30))
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][1, 5:] = (other["input_ids"][1, 5:] + 7) % 300 + 3
    with torch.no_grad():
        a = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        b = model(**{k: v for k, v in other.items() if k != "labels"}).logits
    first = 30 - 1 + model.encode_images(batch["pixel_values"][:1]).shape[1]  # sample 0's rows in the pack
    assert a.shape[:2] == (1, 2 * first)
    torch.testing.assert_close(a[0, :first], b[0, :first], rtol=0, atol=0)
    assert not torch.allclose(a[0, first:], b[0, first:])


def test_pack_rows_restarts_positions_and_cuts_labels_at_sample_starts():
    rows = [torch.randn(3, 4), torch.randn(2, 4)]
    labels = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    packed = pack_rows(rows, labels)
    assert packed["inputs_embeds"].shape == (1, 5, 4)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 5] and packed["max_length_q"] == 3
    # Sample 1's first token is never a target of sample 0's last position.
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]


def test_reference_attention_keeps_samples_apart_and_applies_the_sliding_window():
    torch.manual_seed(0)
    q, k, v = (torch.randn(9, 2, 4) for _ in range(3))
    got = _block_causal_sdpa(q, k, v, torch.tensor([0, 4, 9]), None, (2, 0))  # itself and 2 to the left
    i = torch.arange(9)
    sample = (i >= 4).long()
    mask = (i[None] <= i[:, None]) & (i[None] >= i[:, None] - 2) & (sample[None] == sample[:, None])
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(got, ref)


def test_fused_cross_entropy_equals_the_hf_loss_and_gradients(base):
    batch = ragged_batch(base)
    plain = loss_and_grads(base, batch)
    fused_model = copy.deepcopy(base)
    fused_model.enable_fused_loss()
    assert_same(plain, loss_and_grads(fused_model, batch))
    fused_model.enable_packing()  # both together
    assert_same(plain, loss_and_grads(fused_model, batch))


def test_fused_cross_entropy_chunks_and_frozen_head():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=False)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    ref.backward()
    ref_h, ref_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    loss = fused_linear_cross_entropy(hidden, head, labels, chunk_rows=5)  # 13 labelled rows: 3 chunks
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, ref_h)
    torch.testing.assert_close(head.weight.grad, ref_w)
    head.weight.requires_grad_(False)  # pretrain: the LLM is frozen, only input gradients flow
    hidden.grad = None
    fused_linear_cross_entropy(hidden, head, labels, chunk_rows=5).backward()
    torch.testing.assert_close(hidden.grad, ref_h)
    # A micro-batch with no labelled token (all truncated away) trains on nothing instead of NaN.
    empty = fused_linear_cross_entropy(hidden, head, torch.full_like(labels, IGNORE_INDEX))
    empty.backward()
    assert empty.item() == 0.0


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointing_policies_keep_the_gradients(base, policy):
    batch = ragged_batch(base)
    plain = loss_and_grads(base, batch)
    model = copy.deepcopy(base)
    model.enable_gradient_checkpointing(policy)
    assert_same(plain, loss_and_grads(model, batch))


def test_selective_checkpointing_recomputes_no_matmul(base):
    """Full checkpointing re-runs each block's forward in backward; selective saves the matmul outputs."""
    batch = ragged_batch(base)

    def step_flops(model):
        with FlopCounterMode(display=False) as counter:
            loss_and_grads(model, batch)
        return counter.get_total_flops()

    flops = {}
    for policy in ["none", "full", "selective"]:
        model = copy.deepcopy(base)
        if policy != "none":
            model.enable_gradient_checkpointing(policy)
        flops[policy] = step_flops(model)
    assert flops["full"] > 1.1 * flops["none"], flops
    assert flops["selective"] == flops["none"], flops


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy,recomputed", [("none", False), ("full", True), ("selective", True)])
def test_checkpointing_frees_the_elementwise_intermediates(base, policy, recomputed):
    """The SiLU output is dropped after forward and recomputed in backward under both policies."""
    model = copy.deepcopy(base)
    if policy != "none":
        model.enable_gradient_checkpointing(policy)
    loss = model(**ragged_batch(base)).loss
    with CountOps() as ops:
        loss.backward()
    assert (ops.calls[torch.ops.aten.silu.default] > 0) == recomputed


def test_checkpointing_every_second_layer(base):
    model = copy.deepcopy(base)
    model.enable_gradient_checkpointing("full", every_n_layers=2)
    flags = [layer.gradient_checkpointing for layer in model.llm.model.layers]
    assert flags == [i % 2 == 0 for i in range(len(flags))]
    assert_same(loss_and_grads(base, ragged_batch(base)), loss_and_grads(model, ragged_batch(base)))


def test_compiled_blocks_give_the_eager_loss_and_gradients(base):
    """torch.compile (inductor, C++ on CPU) of every block, with packing and selective checkpointing,
    over two batch shapes (the second compiles the dynamic-shape graph)."""
    from llavaflow.model.llava import compile_counts

    torch._dynamo.utils.counters.clear()  # this process's counts, from here
    model = copy.deepcopy(base)
    model.enable_packing()
    model.enable_gradient_checkpointing("selective")
    model.compile_blocks()
    for lengths, seed in [((40, 23, 31), 0), ((33, 20, 25), 1)]:
        batch = ragged_batch(base, lengths, seed)
        assert_same(loss_and_grads(base, batch), loss_and_grads(model, batch), rtol=1e-4, atol=1e-5)
    # what training prints at its end with compile on: whole blocks compiled, nothing left to eager
    counts = compile_counts()
    assert counts["graphs"] > 0 and counts["graph_breaks"] == 0 and counts["unsupported"] == 0, counts


def test_fused_adamw_steps_like_foreach(base):
    from llavaflow.train.loop import build_optimizer
    from llavaflow.train.recipe import Recipe

    rec = Recipe(stage="finetune", llm="-", visual_encoder="-", datasets=[], train=["projector"], lr=1e-3,
                 weight_decay=0.01, fused_optimizer=True)
    results = []
    for fused in (True, False):
        model = copy.deepcopy(base.projector)
        opt = build_optimizer(list(model.parameters()), Recipe(**{**rec.to_dict(), "fused_optimizer": fused}),
                              torch.device("cpu"))
        assert opt.defaults["fused"] is fused
        for step in range(3):
            torch.manual_seed(step)
            model(torch.randn(4, 5, model.config.visual_hidden_size)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
