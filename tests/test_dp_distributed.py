"""DP-SGD with two gloo processes on CPU: the noise is added once, every rank's LoRA is identical and equals the
single-process run on the global batch (DDP-style gradient averaging of the trainer's own gradient included)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import _free_port

from smplora_plugin.dp import DPTraining, dp_options

pytest.importorskip("opacus")

STEPS = 3
GLOBAL = 4


def _run(rank, world, port, out_dir):
    from test_dp_training import Net, data, lora_params

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    net = Net()
    x, y = data(GLOBAL * STEPS, seed=7)
    dpt = DPTraining(net, dp_options("dpsgd", noise_multiplier=0.8, max_grad_norm=0.05, seed=11),
                     dataset_size=GLOBAL * STEPS, batch_size=GLOBAL)
    opt = torch.optim.SGD(lora_params(net), lr=0.5)
    dpt.attach(opt)
    per = GLOBAL // world
    for step in range(STEPS):
        lo = step * GLOBAL + rank * per
        dpt.collect()
        F.mse_loss(net(x[lo:lo + per]), y[lo:lo + per]).backward()
        if world > 1:     # what DDP does with the trainer's (discarded) gradient
            for p in lora_params(net):
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
    from safetensors.torch import save_file

    out = {f"p{i}": p.detach().contiguous() for i, p in enumerate(lora_params(net))}
    out["steps"] = torch.tensor([dpt.dp.steps])
    save_file(out, os.path.join(out_dir, f"rank{rank}_of{world}.safetensors"))
    if world > 1:
        dist.destroy_process_group()


def test_two_ranks_identical_and_equal_to_one_process(tmp_path):
    from safetensors.torch import load_file

    _run(0, 1, 0, str(tmp_path))
    mp.spawn(_run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = load_file(str(tmp_path / "rank0_of1.safetensors"))
    r0 = load_file(str(tmp_path / "rank0_of2.safetensors"))
    r1 = load_file(str(tmp_path / "rank1_of2.safetensors"))
    assert int(r0["steps"]) == STEPS
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-6)
