"""Two gloo processes on CPU: identical attacker on every rank, and the single-process result."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from smplora_plugin import PrivacyRegularizer

from _helpers import SMALL, TinyDenoiser, batch

STEPS = 5


def _run(rank, world, port, out_dir):
    """Train on this rank's half of each global batch (all ranks when world == 1)."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyDenoiser()
    reg = PrivacyRegularizer(k_steps=2, dropout=0.5, alpha=0.5, **{k: v for k, v in SMALL.items()})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, noise = batch(8, seed=10 + step)
        xn, noisen = batch(6, seed=50 + step)
        per = slice(rank * 8 // world, (rank + 1) * 8 // world)
        per_n = slice(rank * 6 // world, (rank + 1) * 6 // world)
        pred = model(x[per] + noise[per])
        loss = F.mse_loss(pred, noise[per])
        with torch.no_grad():
            nonmember = reg.features(model(xn[per_n] + noisen[per_n]), noisen[per_n])
        out = reg.step(loss, reg.features(pred, noise[per]), nonmember)
        opt.zero_grad()
        out.backward()
        if world > 1:  # what DDP / accelerate do: average the gradients over ranks
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
    result = {f"attacker.{k}": v for k, v in reg.attacker.state_dict().items()}
    result.update({f"model.{k}": v for k, v in model.state_dict().items()})
    result["loss"] = out.detach().reshape(1)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in result.items()},
              os.path.join(out_dir, f"rank{rank}_of{world}.safetensors"))
    if world > 1:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_hold_identical_attackers_matching_a_single_process_run(tmp_path):
    from safetensors.torch import load_file

    _run(0, 1, 0, str(tmp_path))
    mp.spawn(_run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = load_file(str(tmp_path / "rank0_of1.safetensors"))
    r0 = load_file(str(tmp_path / "rank0_of2.safetensors"))
    r1 = load_file(str(tmp_path / "rank1_of2.safetensors"))
    for k in r0:
        if k.startswith("attacker."):
            assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r1[k], single[k], rtol=1e-4, atol=1e-6)
