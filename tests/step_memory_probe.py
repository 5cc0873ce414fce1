"""Run by test_memory.py in a process of its own (DeepSpeed needs a process group): the bytes DeepSpeed's ZeRO-2
optimizer step allocates for a while on top of what already exists, through the training loop's own pieces.

Usage: python step_memory_probe.py RECIPE.json. For each {"precision", "fused_optimizer"} in the recipe's
"cases", builds the loop's model, optimizer and DeepSpeed config, runs two steps on one batch, and prints one
JSON line: the trainable parameter count and the peak of the storages created during the second step and
alive together (a CPU run: torch keeps no allocator statistics there, so a dispatch mode counts them).
"""

import json
import sys
import weakref

import deepspeed
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llavaflow.distributed import init_distributed
from llavaflow.train import loop
from llavaflow.train.recipe import Recipe


class NewStorages(TorchDispatchMode):
    """Live bytes of the storages that ops create while active, and their peak. An op's output that shares an
    input's storage (a view, detach, an in-place op) creates nothing; a storage is gone when torch frees it."""

    def __init__(self):
        super().__init__()
        self.live, self.total, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self.live or storage.nbytes() == 0:
                continue
            self.live[ptr] = storage.nbytes()
            self.total += storage.nbytes()
            self.peak = max(self.peak, self.total)
            weakref.finalize(storage, self._freed, ptr)
        return out

    def _freed(self, ptr):
        self.total -= self.live.pop(ptr, 0)


def main():
    job = json.loads(open(sys.argv[1]).read())
    _, world, device = init_distributed(group_of_one=True)
    for case in job.pop("cases"):
        recipe = Recipe(**{**job, **case})
        torch.manual_seed(0)
        model = loop.build_model(recipe)
        params = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=loop.build_optimizer(params, recipe, device),
            config=loop.deepspeed_config(recipe, world, recipe.precision))
        ids = torch.randint(0, model.llm.config.vocab_size, (4, 16))  # the recipe trains the LLM: all of it is used
        for step in range(2):  # the first step also creates the AdamW moments
            engine.backward(engine.module.llm(input_ids=ids, labels=ids).loss)
            tracker = NewStorages()
            with tracker:
                engine.step()
        print(json.dumps({**case, "trainable": sum(p.numel() for p in params), "step_peak_bytes": tracker.peak}),
              flush=True)
        del engine, model
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
