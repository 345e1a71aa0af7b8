"""Data parallel training: two gloo processes on CPU against one process on the concatenated batch."""
import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import swinv2_fast
from conftest import MODEL_GRAD_FP32_ATOL, MODEL_GRAD_FP32_RTOL, assert_close, perturb_

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

TINY = dict(image_size=32, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 1], drop_path_rate=0.0,
            num_labels=3)
STEPS = 2
WORLD = 2


def _model(implementation):
    config = swinv2_fast.Swinv2Config(**TINY)
    return perturb_(swinv2_fast.Swinv2ForImageClassification(config), seed=11).set_attn_implementation(implementation)


def _batches():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(STEPS)]


def _train(model, batches, rank=0, world=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, labels in batches:
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        optimizer.zero_grad(set_to_none=True)
        model(x[shard], labels=labels[shard]).loss.backward()  # mean loss: DDP averages the shard gradients
        optimizer.step()
    return model


def _worker(rank, implementation, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(_model(implementation).train())
        _train(model, _batches(), rank, WORLD)
        if rank == 0:
            torch.save(model.module.state_dict(), os.path.join(out_dir, "ddp.pt"))
        # Tear down in order: every collective finished on both ranks, then the DDP wrapper (its reducer holds
        # the process group and the last gradient buckets) freed, then the group destroyed, all while the
        # interpreter is alive. Left to interpreter exit, gloo's worker threads can free tensors after Python
        # is gone and the process aborts ("terminate called without an active exception", seen once in CI).
        dist.barrier()
        del model
        gc.collect()
    finally:
        dist.destroy_process_group()
    # reached only when this rank's work and teardown are complete; a crash after it is one at interpreter exit
    open(os.path.join(out_dir, f"rank{rank}.done"), "w").close()


@pytest.mark.parametrize("implementation", ["eager", "triton"])
def test_ddp_two_processes_match_one_process(implementation):
    if implementation == "triton":
        pytest.importorskip("triton")
        from swinv2_fast.kernels import triton_window_attention as tk

        if not tk.INTERPRETED and not torch.cuda.is_available():
            pytest.skip("the fused path needs CUDA or TRITON_INTERPRET=1")
    single = _train(_model(implementation).train(), _batches())
    with tempfile.TemporaryDirectory() as out_dir:
        # spawned workers inherit this environment, TRITON_INTERPRET included
        try:
            mp.spawn(_worker, args=(implementation, os.path.join(out_dir, "init"), out_dir), nprocs=WORLD, join=True)
        except mp.ProcessExitedException as error:
            done = sorted(name for name in os.listdir(out_dir) if name.endswith(".done"))
            raise AssertionError(f"a worker died ({error}); ranks that had finished their work and teardown: "
                                 f"{done or 'none'}") from error
        ddp = torch.load(os.path.join(out_dir, "ddp.pt"))
    expected = single.state_dict()
    assert ddp.keys() == expected.keys()
    moved = 0
    for key, value in expected.items():
        assert_close(ddp[key], value, atol=MODEL_GRAD_FP32_ATOL, rtol=MODEL_GRAD_FP32_RTOL, name=key)
        moved += int(not torch.equal(value, _model(implementation).state_dict()[key]))
    assert moved > 0  # the steps changed the parameters: the comparison is not of two untouched models
