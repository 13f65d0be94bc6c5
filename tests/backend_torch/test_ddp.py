"""DistributedDataParallel (gloo, 2 CPU processes): gradients equal single-process training on the whole batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from doconv.torch import DOConv1d, DOConv2d, DOConv3d

# The workers run in a fresh interpreter (spawned processes must import their target by name, and
# pytest's importlib mode gives this file no importable name).
WORKER = textwrap.dedent('''
    import os
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    def run(rank, world, store, state, batch, out):
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
        torch.set_num_threads(1)
        model = torch.load(state, weights_only=False)
        ddp = DDP(model)
        x, target = torch.load(batch)
        half = x.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        loss = (ddp(x[sl]) - target[sl]).square().mean()
        loss.backward()
        if rank == 0:
            torch.save({k: p.grad for k, p in model.named_parameters()}, out)
        # Both ranks leave together: tearing gloo down while the peer still runs can abort (seen in CI).
        dist.barrier()
        dist.destroy_process_group()
        # gloo's background threads can still abort the interpreter's own exit ("terminate called without an
        # active exception"); the work is done and saved, so leave without running the C++ destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    if __name__ == "__main__":
        store, state, batch, out = sys.argv[1:]
        mp.spawn(run, args=(2, store, state, batch, out), nprocs=2, join=True)
''')


#: per rank: the layer class, per-side pads of the second layer, the input's spatial size
RANKS = {1: (DOConv1d, ((0, 1),), (9,)), 2: (DOConv2d, ((0, 1), (1, 0)), (6, 7)),
         3: (DOConv3d, ((1, 0), (0, 1), (1, 0)), (4, 5, 4))}


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_ddp_gradients_equal_single_process(rank, tmp_path):
    layer, pads, spatial = RANKS[rank]
    torch.manual_seed(0)
    model = nn.Sequential(layer(3, 4, 3, padding=1, D_mul=3 ** rank + 3), nn.ReLU(),
                          layer(4, 4, 3, groups=2, padding=pads, padding_mode="reflect"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, layer):
                m.D.normal_(0, 0.3)
    x = torch.randn(4, 3, *spatial)
    target = torch.randn(4, 4, *(s - 1 for s in spatial))
    torch.save(model, tmp_path / "model.pt")
    torch.save((x, target), tmp_path / "batch.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(tmp_path / "model.pt"),
                    str(tmp_path / "batch.pt"), str(tmp_path / "grads.pt")], check=True, timeout=240)
    grads = torch.load(tmp_path / "grads.pt")
    (model(x) - target).square().mean().backward()
    assert set(grads) == {k for k, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
