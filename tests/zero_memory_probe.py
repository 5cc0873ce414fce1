"""Run by test_memory.py in a process of its own (DeepSpeed needs a process group): the bytes DeepSpeed's ZeRO-2
allocates through the training loop's own model, optimizer and config, from its initialisation on.

Usage: python zero_memory_probe.py RECIPE.json. For each case in the recipe's "cases" (recipe keys: precision,
fused_optimizer, offload_optimizer, accumulative_counts), builds the loop's model, optimizer and DeepSpeed
engine and runs two optimizer steps on one batch, then prints one JSON line for the last micro-step: the
bytes alive after its backward (`resident`), what its backward allocated for a while on top of what was
alive when it began (`backward_extra`: the reduce buckets), and what the optimizer step did on top of
`resident` (`step_extra`). A CPU run: torch keeps no allocator statistics there, so a dispatch mode counts the
storages created since the engine's initialisation; what existed before (the fp32 model) is not counted.
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
            if t.device.type == "meta" or ptr in inputs or ptr in self.live or storage.nbytes() == 0:
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
        ids = torch.randint(0, model.llm.config.vocab_size, (4, 16))  # the recipe trains the LLM: all of it is used
        tracker = NewStorages()
        with tracker:
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=loop.build_optimizer(params, recipe, device),
                config=loop.deepspeed_config(recipe, world, recipe.precision, trainable=sum(p.numel() for p in params)))
            for _ in range(2 * recipe.accumulative_counts):  # the first step also creates the AdamW moments
                loss = engine.module.llm(input_ids=ids, labels=ids).loss
                began = tracker.peak = tracker.total
                engine.backward(loss)
                resident, backward_peak = tracker.total, tracker.peak
                tracker.peak = tracker.total
                engine.step()
        print(json.dumps({**case, "trainable": sum(p.numel() for p in params), "resident": resident,
                          "backward_extra": backward_peak - began, "step_extra": tracker.peak - resident}), flush=True)
        del engine, model, loss
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
