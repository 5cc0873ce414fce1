"""Memory of one training rank under DeepSpeed ZeRO, per setting: a model in bytes, to plan a fine-tune.

States, per trainable parameter unless said (ZeRO-1/2 partitions the last four over `world` ranks; on one
rank it shards nothing):
  weights       every parameter, in the compute dtype (bf16: 2 B)
  grads         ZeRO's contiguous gradient partition, compute dtype (2 B); plus the reduce bucket(s)
  master        the fp32 copy the optimizer steps (4 B)
  adam          exp_avg + exp_avg_sq, fp32 (8 B)
  step_grad     at the step, the fp32 copy of the gradient partition (4 B) and, while it is cast, the flat
                compute-dtype copy it is cast from (2 B in bf16; in fp32 the cast is a no-op) - or, with a
                non-fused (foreach) AdamW, its sqrt(exp_avg_sq) temporary (4 B) during the update instead.
                DeepSpeed 0.19's ZeRO-1/2 step; tests/test_memory.py measures it through the loop's engine.
With offload_optimizer=cpu, master, adam and the fp32 gradients live in host memory and the GPU keeps weights
and the reduce buckets (gradients are copied to the host bucket by bucket).

Activations, per token and layer, counted from the tensors autograd keeps for backward in a Phi-3 decoder
layer (HF's modules: unfused RMSNorm that upcasts to fp32, fused qkv and gate_up projections, SDPA that
keeps q, k, v, its output and a fp32 log-sum-exp per head); see the element counts below. The rotary
cos/sin (2 x head_dim per token) are shared by all layers and left out. Checkpointing:
  none       everything above
  full       the block input only, plus one block's activations while it is recomputed in backward
  selective  the block input and the outputs of every matmul and of attention (checkpointing.py's policy)
Logits (lm_head output, its fp32 upcast and log-softmax) are added unless fused_loss, which keeps
[labelled tokens x vocab] per chunk only (ignored here). The ViT's activations use the same accounting
for a CLIP block (LayerNorm, separate q/k/v, quick-GELU MLP) over its 577 tokens per image.
tests/test_memory.py checks the counts against torch's saved tensors at tiny width, and the parameter
counts against the real architecture on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass(frozen=True)
class Shapes:
    params: int  # all parameters
    trainable: int
    llm_layers: int
    hidden: int
    ffn: int
    heads: int
    vocab: int
    vit_layers: int
    vit_hidden: int
    vit_ffn: int
    vit_heads: int
    vit_tokens: int  # patches + CLS

    @classmethod
    def of(cls, model) -> "Shapes":
        llm, vit = model.llm.config, model.visual_encoder.config
        return cls(sum(p.numel() for p in model.parameters()),
                   sum(p.numel() for p in model.parameters() if p.requires_grad),
                   llm.num_hidden_layers, llm.hidden_size, llm.intermediate_size, llm.num_attention_heads,
                   llm.vocab_size, vit.num_hidden_layers, vit.hidden_size, vit.intermediate_size,
                   vit.num_attention_heads, (vit.image_size // vit.patch_size) ** 2 + 1)


def llm_layer_saved(hidden: int, ffn: int, heads: int, policy: str, dtype_bytes: int) -> float:
    """Bytes per token one Phi-3 decoder layer keeps for backward under `policy`."""
    c, f32 = dtype_bytes, 4
    h, f, n = hidden, ffn, heads
    if policy == "full":
        return h * c  # the block input
    if policy == "selective":
        # input, qkv, attention output + lse, o_proj output, gate_up, down_proj output
        return (h + 3 * h + h + h + 2 * f + h) * c + n * f32
    # fp32 upcast (the input itself in fp32), rsqrt, normed input of the weight's mul, output (the projection's input)
    norm = h * f32 + 1 * f32 + h * c + h * c
    # qkv output (v is a view of it), rotated q and k, output + fp32 lse, the output's contiguous copy for o_proj
    attention = 3 * h * c + 2 * h * c + h * c + n * f32 + h * c
    mlp = 2 * f * c + f * c + f * c  # gate_up output, silu(gate), silu(gate) * up (down_proj's input)
    return 2 * norm + attention + mlp


def vit_layer_saved(hidden: int, ffn: int, heads: int, policy: str, dtype_bytes: int) -> float:
    """Bytes per token one CLIP encoder layer keeps for backward under `policy`."""
    c, f32 = dtype_bytes, 4
    h, f, n = hidden, ffn, heads
    if policy == "full":
        return h * c
    if policy == "selective":
        return (h + 3 * h + h + h + f + h) * c + n * f32  # input, q/k/v, attention out + lse, out_proj, fc1, fc2
    norm = h * c + 2 * f32 + h * c  # input, mean and rstd, normed output
    attention = 3 * h * c + h * c + n * f32  # q, k, v, output, lse
    mlp = f * c + f * c + f * c  # fc1 output, sigmoid(1.702 x), x * sigmoid (fc2's input)
    return 2 * norm + attention + mlp


@dataclass(frozen=True)
class Estimate:
    weights: float
    grads: float
    master: float
    adam: float
    step_grad: float
    activations: float
    host: float  # bytes in host memory (offload)

    @property
    def peak(self) -> float:
        """GPU bytes at the worse of backward's end (activations live) and the optimizer step."""
        resident = self.weights + self.grads + self.master + self.adam
        return max(resident + self.activations, resident + self.step_grad)

    def gib(self) -> dict:
        return {k: round(v / GiB, 2) for k, v in {**self.__dict__, "peak": self.peak}.items()}


def estimate(shapes: Shapes, *, tokens: int, images: int, policy: str, dtype_bytes: int = 2, world: int = 1,
             offload_optimizer: str = "none", fused_loss: bool = False, trains_vit: bool = True,
             overlap_comm: bool = True, fused_optimizer: bool = True) -> Estimate:
    """One rank's memory for a micro-batch of `tokens` LLM tokens (image rows included) and `images` images."""
    p, t = shapes.params, shapes.trainable
    buckets = (2 if overlap_comm else 1) * min(REDUCE_BUCKET, t) * dtype_bytes
    offload = offload_optimizer != "none"
    part = t / world
    flat_copy = 0 if dtype_bytes == 4 else dtype_bytes  # what the fp32 gradient copy is cast from
    step_grad = (4 + max(flat_copy, 0 if fused_optimizer else 4)) * part
    grads = buckets + (0 if offload else dtype_bytes * part)
    llm = shapes.llm_layers * llm_layer_saved(shapes.hidden, shapes.ffn, shapes.heads, policy, dtype_bytes) * tokens
    if policy == "full":  # one block recomputed at a time during backward
        llm += llm_layer_saved(shapes.hidden, shapes.ffn, shapes.heads, "none", dtype_bytes) * tokens
    # A frozen ViT (pretrain) runs with no input needing a gradient: autograd keeps nothing of it.
    vit = shapes.vit_layers * vit_layer_saved(shapes.vit_hidden, shapes.vit_ffn, shapes.vit_heads, policy,
                                              dtype_bytes) * images * shapes.vit_tokens if trains_vit else 0
    logits = 0 if fused_loss else tokens * shapes.vocab * (dtype_bytes + 4 + 4)
    return Estimate(weights=dtype_bytes * p, grads=grads, master=0 if offload else 4 * part,
                    adam=0 if offload else 8 * part, step_grad=0 if offload else step_grad,
                    activations=llm + vit + logits, host=16 * part if offload else 0)  # master, moments, fp32 grads
