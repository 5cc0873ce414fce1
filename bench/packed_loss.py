"""The packed path's loss against the padded path's on the same micro-batch, printed as JSON.

On a GPU in bf16 packing runs attention through torch's `varlen_attn` (packing.py); this checks, at the
real architecture (random init), that its loss and the gradient of the projector equal the padded SDPA
batch's within bf16 tolerance. The samples have varied lengths (64-832 text tokens, as train_step.py's
`--lengths varied`), so padding and sample boundaries both matter. bf16's own noise is measured too: both
paths against the padded path in fp32 on the same (upcast) weights; the packed gradient must be no further
from that reference than twice the padded one.

  python3 packed_loss.py [--micro-batch 8] [--small | --tiny]
"""

import argparse
import copy
import json

import torch

from common import build_model, device_name
from train_step import make_batch, text_lengths

from llavaflow.model import packing


def loss_and_grad(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in model.projector.parameters()])
    return loss.item(), grad


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--small", action="store_true")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    model, device, dtype = build_model(args.small, tiny=args.tiny)
    model.set_trainable(["projector"])  # gradients through the whole LLM and attention, as in pretrain
    model.train()
    size = model.visual_encoder.config.image_size
    batch = make_batch(text_lengths(args.micro_batch, "varied", 0, seed=1), size, seed=2)
    batch = {k: v.to(device) for k, v in batch.items()}
    # the reference: the padded path in fp32 on the same weights (checkpointed: fp32 activations of the whole
    # model would not fit beside them)
    reference = copy.deepcopy(model).float()
    reference.enable_gradient_checkpointing("full")
    ref_loss, ref_grad = loss_and_grad(reference, {**batch, "pixel_values": batch["pixel_values"].float()})
    del reference
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    padded_loss, padded_grad = loss_and_grad(model, batch)
    model.enable_packing()
    packed_loss, packed_grad = loss_and_grad(model, batch)
    uses_varlen = packing.varlen_attn is not None and device == "cuda" and dtype in (torch.bfloat16, torch.float16)
    rel_loss = abs(packed_loss - padded_loss) / abs(padded_loss)
    rel_grad = ((packed_grad - padded_grad).norm() / padded_grad.norm()).item()
    padded_err = ((padded_grad - ref_grad).norm() / ref_grad.norm()).item()
    packed_err = ((packed_grad - ref_grad).norm() / ref_grad.norm()).item()
    # bf16: each sum of 3072 products rounds to ~3e-3 relative; a wrong mask or boundary moves the loss
    # by far more (a token seeing another sample's tokens changes its logits completely).
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    print(json.dumps({"bench": "packed_loss", "device": device_name(), "dtype": str(dtype).removeprefix("torch."),
                      "varlen_attn": uses_varlen, "micro_batch": args.micro_batch, "padded_loss": padded_loss,
                      "packed_loss": packed_loss, "fp32_loss": ref_loss, "loss_rel_diff": rel_loss,
                      "projector_grad_rel_diff": rel_grad, "padded_grad_rel_err_vs_fp32": padded_err,
                      "packed_grad_rel_err_vs_fp32": packed_err, "tolerance": tolerance,
                      "equal": rel_loss < tolerance and packed_err <= max(2 * padded_err, tolerance)}))


if __name__ == "__main__":
    main()
