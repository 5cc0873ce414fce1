"""Memory of one training rank under DeepSpeed ZeRO, per setting: a model in bytes, to plan a fine-tune.

States, per trainable parameter unless said (ZeRO-2 partitions grads, master and adam over `world` ranks; on
one rank it shards nothing), as DeepSpeed 0.19's ZeRO-2 allocates them (tests/test_memory.py measures each
through the training loop's own engine):
  weights       every parameter, in the compute dtype (bf16: 2 B)
  grads         ZeRO's contiguous gradient partition, compute dtype (2 B)
  master        the fp32 copy the optimizer steps (4 B)
  adam          exp_avg + exp_avg_sq, fp32 (8 B)
  buckets       the reduce buckets, allocated whole at each backward's start and freed at its end: two of
                reduce_bucket_size elements with overlap_comm, one without (reduce_bucket_elements)
  step_grad     at the step, the fp32 copy of the gradient partition (4 B) and, while it is cast, the flat
                compute-dtype copy it is cast from (2 B in bf16; in fp32 the cast is a no-op). Both the
                partition and the flat copy are freed before the update, where a non-fused (foreach) AdamW
                adds its sqrt(exp_avg_sq) temporary (4 B) to the fp32 copy: in bf16 that peaks no higher.
With offload_optimizer=cpu the GPU keeps the weights, the buckets and a staging buffer the size of the largest
trainable parameter; host memory holds master, adam and the fp32 gradients (16 B), a compute-dtype copy of
the partition the updated weights go back through, with accumulative_counts > 1 a compute-dtype gradient
accumulator per parameter, and a staging buffer the size of the largest parameter. A fused AdamW steps
there in place; a foreach AdamW adds its 4 B temporary.

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


def reduce_bucket_elements(trainable: int) -> int:
    """The reduce bucket size the training loop gives DeepSpeed: its default, or the trainable count when that
    is smaller. DeepSpeed allocates each bucket whole at every backward, so a 12.6M-parameter projector would
    otherwise hold 1.9 GiB of buckets; one bucket of the trainable count holds every gradient either way."""
    return min(REDUCE_BUCKET, trainable)


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
    largest_trainable: int  # elements of the largest trainable parameter (sizes the offload staging buffers)

    @classmethod
    def of(cls, model) -> "Shapes":
        """The model's shapes, its parameters' requires_grad saying what trains."""
        llm, vit = model.llm.config, model.visual_encoder.config
        trainable = [p.numel() for p in model.parameters() if p.requires_grad]
        return cls(sum(p.numel() for p in model.parameters()), sum(trainable),
                   llm.num_hidden_layers, llm.hidden_size, llm.intermediate_size, llm.num_attention_heads,
                   llm.vocab_size, vit.num_hidden_layers, vit.hidden_size, vit.intermediate_size,
                   vit.num_attention_heads, (vit.image_size // vit.patch_size) ** 2 + 1, max(trainable, default=0))


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
    grads: float  # ZeRO's gradient partition; offloaded, a staging buffer the size of the largest parameter
    master: float
    adam: float
    buckets: float  # during backward only
    step_grad: float  # during the optimizer step only
    activations: float
    host: float  # peak bytes in host memory (offload)

    @property
    def resident(self) -> float:
        """GPU bytes held from one backward's end through the optimizer step."""
        return self.weights + self.grads + self.master + self.adam

    @property
    def peak(self) -> float:
        """GPU bytes at the worse of backward's start (activations and buckets live) and the optimizer step."""
        return max(self.resident + self.buckets + self.activations, self.resident + self.step_grad)

    def gib(self) -> dict:
        return {k: round(v / GiB, 2) for k, v in {**self.__dict__, "peak": self.peak}.items()}


def estimate(shapes: Shapes, *, tokens: int, images: int, policy: str, dtype_bytes: int = 2, world: int = 1,
             offload_optimizer: str = "none", accumulative_counts: int = 1, fused_loss: bool = False,
             trains_vit: bool = True, overlap_comm: bool = True, fused_optimizer: bool = True) -> Estimate:
    """One rank's memory for a micro-batch of `tokens` LLM tokens (image rows included) and `images` images."""
    c, part, largest = dtype_bytes, shapes.trainable / world, shapes.largest_trainable
    offload = offload_optimizer != "none"
    flat_copy = 0 if c == 4 else c  # what the fp32 gradient copy is cast from
    step_grad = (4 + max(flat_copy, (0 if fused_optimizer else 4) - c)) * part  # the partition is freed first
    llm = shapes.llm_layers * llm_layer_saved(shapes.hidden, shapes.ffn, shapes.heads, policy, c) * tokens
    if policy == "full":  # one block recomputed at a time during backward
        llm += llm_layer_saved(shapes.hidden, shapes.ffn, shapes.heads, "none", c) * tokens
    # A frozen ViT (pretrain) runs with no input needing a gradient: autograd keeps nothing of it.
    vit = shapes.vit_layers * vit_layer_saved(shapes.vit_hidden, shapes.vit_ffn, shapes.vit_heads, policy,
                                              c) * images * shapes.vit_tokens if trains_vit else 0
    logits = 0 if fused_loss else tokens * shapes.vocab * (c + 4 + 4)
    host = 0.0
    if offload:  # master, moments, fp32 grads; the weights' way back; the accumulator; the staging buffer
        host = (16 + c + (c if accumulative_counts > 1 else 0)) * part + c * largest
        host += 0 if fused_optimizer else 4 * part
    return Estimate(weights=c * shapes.params, grads=c * largest if offload else c * part,
                    master=0 if offload else 4 * part, adam=0 if offload else 8 * part,
                    buckets=(2 if overlap_comm else 1) * reduce_bucket_elements(shapes.trainable) * c, step_grad=0 if offload else step_grad,
                    activations=llm + vit + logits, host=host)
