"""Distributed training: two gloo processes on CPU (DDP, and FSDP2's fully_shard per stage, with and
without activation checkpointing) against one process on the concatenated batch."""

import collections
import contextlib
import gc
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import swinv2_fast

from _utils import (
    MODEL_GRAD_FP32_ATOL,
    MODEL_GRAD_FP32_RTOL,
    assert_close,
    backward_launches,
    count_launches,
    forward_launches,
    perturb_,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")]

TINY = dict(
    image_size=32, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 1], drop_path_rate=0.0, num_labels=3
)
STEPS = 2
WORLD = 2


def _model(implementation):
    config = swinv2_fast.Swinv2Config(**TINY)
    return perturb_(swinv2_fast.Swinv2ForImageClassification(config), seed=11).set_attn_implementation(implementation)


def _batches():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(STEPS)]


def _train(model, batches, rank=0, world=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, labels in batches:
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        optimizer.zero_grad(set_to_none=True)
        model(x[shard], labels=labels[shard]).loss.backward()  # mean loss: DDP averages the shard gradients
        optimizer.step()
    return model


def _wrap(model, mode):
    """The distributed wrapper a user writes: DDP, or FSDP2 with one fully_shard per stage and one for the
    root (optionally with the model's activation checkpointing)."""
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    if mode == "fsdp2-checkpointed":
        model.gradient_checkpointing_enable({"use_reentrant": False})
    for stage in model.swinv2.encoder.layers:
        fully_shard(stage)
    return fully_shard(model)


def _full_state(model, mode):
    if mode == "ddp":
        return model.module.state_dict()
    # FSDP2 parameters are DTensors sharded over the ranks: gathered whole on every rank
    return {
        key: value.full_tensor() if hasattr(value, "full_tensor") else value
        for key, value in model.state_dict().items()
    }


def _worker(rank, implementation, mode, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = _wrap(_model(implementation).train(), mode)
        counting = count_launches() if implementation == "triton" else contextlib.nullcontext(collections.Counter())
        with counting as launches:
            _train(model, _batches(), rank, WORLD)
        state = _full_state(model, mode)
        if rank == 0:
            torch.save(state, os.path.join(out_dir, "distributed.pt"))
        with open(os.path.join(out_dir, f"launches{rank}.json"), "w") as f:
            json.dump(dict(launches), f)
        # Tear down in order: every collective finished on both ranks, then the wrapper (DDP's reducer holds
        # the process group and the last gradient buckets) freed, then the group destroyed, all while the
        # interpreter is alive. Left to interpreter exit, gloo's worker threads can free tensors after Python
        # is gone and the process aborts ("terminate called without an active exception", seen once in CI).
        dist.barrier()
        del model, state
        gc.collect()
    finally:
        dist.destroy_process_group()
    # reached only when this rank's work and teardown are complete; a crash after it is one at interpreter exit
    open(os.path.join(out_dir, f"rank{rank}.done"), "w").close()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2-checkpointed"])
@pytest.mark.parametrize("implementation", ["eager", pytest.param("triton", marks=pytest.mark.kernels(backward=True))])
def test_two_processes_match_one_process(implementation, mode):
    """After two optimizer steps (SGD with momentum) on half the batch each, the two ranks' parameters equal
    one process's on the whole batch, within the fp32 model gradient tolerance; with "triton" the fused
    forward and backward kernels ran on both ranks."""
    single = _train(_model(implementation).train(), _batches())
    with tempfile.TemporaryDirectory() as out_dir:
        # spawned workers inherit this environment, TRITON_INTERPRET included; they import tests/_utils.py (through
        # this module), which applies the same stack shims
        try:
            mp.spawn(
                _worker, args=(implementation, mode, os.path.join(out_dir, "init"), out_dir), nprocs=WORLD, join=True
            )
        except mp.ProcessExitedException as error:
            done = sorted(name for name in os.listdir(out_dir) if name.endswith(".done"))
            raise AssertionError(
                f"a worker died ({error}); ranks that had finished their work and teardown: {done or 'none'}"
            ) from error
        distributed = torch.load(os.path.join(out_dir, "distributed.pt"))
        launches = []
        for rank in range(WORLD):
            with open(os.path.join(out_dir, f"launches{rank}.json")) as f:
                launches.append(collections.Counter(json.load(f)))
    if implementation == "triton":
        for rank_launches in launches:
            assert forward_launches(rank_launches) > 0 and backward_launches(rank_launches) > 0, rank_launches
    expected = single.state_dict()
    assert distributed.keys() == expected.keys()
    moved = 0
    initial = _model(implementation).state_dict()
    for key, value in expected.items():
        assert_close(distributed[key], value, atol=MODEL_GRAD_FP32_ATOL, rtol=MODEL_GRAD_FP32_RTOL, name=key)
        moved += int(not torch.equal(value, initial[key]))
    assert moved > 0  # the steps changed the parameters: the comparison is not of two untouched models
