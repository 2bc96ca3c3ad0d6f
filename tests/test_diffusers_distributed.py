"""Two accelerate / DDP processes (gloo, CPU) with a peft LoRA on the tiny UNet and the diffusers shim.

After N steps both ranks hold bit-identical attacker (and LoRA) weights, and the result matches one
process that trains on the same global batch (members and held-out non-members) within float tolerance.
With --privacy dpsgd both ranks hold the same LoRA, equal to DPGradients' loop on the global batch.
"""

import argparse
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("sklearn")

STEPS = 3
GLOBAL_BATCH = 4       # members per step over all ranks (and non-members per step)
TINY = dict(unet_channels=(8, 16), unet_norm_groups=4, attention_head_dim=4, vae_channels=(8, 8), vae_norm_groups=4,
            cross_attention_dim=16, text_layers=1, text_heads=2, text_intermediate=32, max_length=8)


def _privacy_args(holdout_dir):
    from smplora_plugin.integrations.diffusers import add_privacy_args

    parser = add_privacy_args(argparse.ArgumentParser())
    return parser.parse_args([
        "--privacy", "smplora", "--privacy_holdout_dir", str(holdout_dir), "--privacy_alpha", "1.0",
        "--privacy_k_steps", "2", "--privacy_attacker_hidden", "16", "8", "--privacy_attacker_lr", "1e-2",
        "--privacy_feature_grid", "8", "--privacy_seed", "5", "--privacy_nonmember_every", "1",
    ])


def _worker(rank, world, port, root, out_dir):
    """One accelerate process (gloo on CPU); saves its result to ``out_dir``."""
    torch.set_num_threads(1)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from accelerate import Accelerator
    from safetensors.torch import save_file

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world, accelerator.state
    result = _train(rank, world, root, accelerator)
    save_file(result, os.path.join(out_dir, f"rank{rank}_of{world}.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _train(rank, world, root, accelerator=None):
    """STEPS LoRA steps with the shim; ``accelerator=None`` is the plain single-process reference loop."""
    import contextlib

    import numpy as np
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image

    from smplora_plugin.integrations.diffusers import HoldoutImages, PrivacyRegularizer, list_images
    from smplora_plugin.tiny_sd import TinySDConfig, build_components

    parts = build_components(TinySDConfig(**TINY))
    unet, vae, text_encoder, tok, sched = (parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=2.0)  # SGD: a wrong gradient scale would show (Adam would hide it)
    if accelerator is not None:
        unet, optimizer = accelerator.prepare(unet, optimizer)

    def preprocess(examples):  # the script's batched preprocessing
        examples["pixel_values"] = [
            torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            for im in examples["image"]]
        examples["input_ids"] = tok(examples["text"], max_length=tok.model_max_length, padding="max_length",
                                    truncation=True, return_tensors="pt").input_ids
        return examples

    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "input_ids": torch.stack([r["input_ids"] for r in rows])}

    def forward(batch, seeds):  # per-sample noise and timesteps, so any batch split gives the same samples
        latents = vae.encode(batch["pixel_values"]).latent_dist.mean * vae.config.scaling_factor
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        t = torch.tensor([(s * 7919) % sched.config.num_train_timesteps for s in seeds])
        ehs = text_encoder(batch["input_ids"], return_dict=False)[0]
        pred = unet(sched.add_noise(latents, noise, t), t, ehs, return_dict=False)[0]
        return pred, noise

    args = _privacy_args(os.path.join(root, "holdout"))
    reg = PrivacyRegularizer.from_args(args, device="cpu")
    holdout = HoldoutImages.from_args(args, preprocess, collate, accelerator,
                                      batch_size=GLOBAL_BATCH // world, train_dir=os.path.join(root, "train"))
    if accelerator is not None:
        reg.attach(accelerator, holdout)
    else:
        reg.holdout = holdout
    train_files = list_images(os.path.join(root, "train"))
    captions = [open(str(f)[:-4] + ".txt").read().strip() for f in train_files]
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        gids = [step * GLOBAL_BATCH + j for j in range(rank * per, (rank + 1) * per)]
        images = []
        for g in gids:
            with Image.open(train_files[g % len(train_files)]) as im:
                images.append(im.convert("RGB"))
        cols = preprocess({"image": images, "text": [captions[g % len(train_files)] for g in gids]})
        batch = collate([{"pixel_values": cols["pixel_values"][i], "input_ids": cols["input_ids"][i]}
                         for i in range(len(gids))])
        with (accelerator.accumulate(unet) if accelerator is not None else contextlib.nullcontext()):
            pred, target = forward(batch, [1000 * step + g for g in gids])
            mse = F.mse_loss(pred.float(), target.float())
            sync = accelerator.sync_gradients if accelerator is not None else True
            n = reg.privacy_rows(len(gids))
            ids = [500_000 + 1000 * step + g for g in gids]
            nonmember = reg.nonmember_features(lambda b, ids=ids: forward(b, ids), rows=n, sync=sync)
            loss = reg.step(mse, reg.features(pred, target, rows=n), nonmember, update_attacker=sync)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    result = {f"attacker.{k}": v for k, v in reg.attacker.state_dict().items()}
    model = accelerator.unwrap_model(unet) if accelerator is not None else unet
    result.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(model).items()})
    # the regularised loss is the global one on every rank; the value reg.step returns is this rank's own
    # denoising loss (what the script shows), its gradient the regularised loss's
    result["loss"] = torch.tensor([reg.metrics()["regularized_loss"]])
    result["shown_minus_mse"] = (loss.detach() - mse.detach()).abs().reshape(1)
    result["updates"] = torch.tensor([reg.attacker_updates, holdout.draws])
    return {k: v.detach().contiguous().clone() for k, v in result.items()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_each_other_and_a_single_process(tmp_path):
    from safetensors.torch import load_file

    from smplora_plugin.tiny_sd import write_digit_images

    root = tmp_path / "data"
    write_digit_images(root / "train", n=12, start=0)
    write_digit_images(root / "holdout", n=12, start=12)
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), str(root), str(out)), nprocs=2, join=True, start_method="spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train(0, 1, str(root))  # the reference: one process, the global batch, no accelerate
    finally:
        torch.set_num_threads(threads)
    r0, r1 = (load_file(str(out / name)) for name in ("rank0_of2.safetensors", "rank1_of2.safetensors"))
    assert set(r0) == set(r1) == set(single)
    attacker_keys = [k for k in r0 if k.startswith("attacker.")]
    lora_keys = [k for k in r0 if k.startswith("lora.")]
    assert attacker_keys and lora_keys
    for k in attacker_keys + lora_keys:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    # the attacker updated once per step on every rank; each rank drew its holdout slice once per step
    assert r0["updates"].tolist() == r1["updates"].tolist() == single["updates"].tolist() == [STEPS, STEPS]
    for k in attacker_keys + lora_keys + ["loss"]:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert r0["shown_minus_mse"].item() == r1["shown_minus_mse"].item() == single["shown_minus_mse"].item() == 0.0
    # training moved the LoRA and the attacker far beyond the tolerance (the comparison is meaningful)
    b_keys = [k for k in lora_keys if "lora_B" in k]
    assert max(single[k].abs().max().item() for k in b_keys) > 1e-3


# ------------------------------------------------------------------------------------------- DP-SGD over two ranks
DP_N, DP_SIGMA, DP_CLIP, DP_SEED = 12, 0.5, 0.01, 7


def _dp_sample(i):
    """Sample ``i``'s noisy latents, timestep, text embeddings and target, from its own seed (any split agrees)."""
    g = torch.Generator().manual_seed(1000 + i)
    x, c = torch.randn(4, 8, 8, generator=g), torch.randn(TINY["max_length"], TINY["cross_attention_dim"], generator=g)
    return x, torch.tensor((i * 7919) % 1000), c, torch.randn(4, 8, 8, generator=g)


def _dp_batch(ids):
    return [torch.stack(col) for col in zip(*(_dp_sample(i) for i in ids))]


def _dp_unet():
    from peft import LoraConfig

    from smplora_plugin.tiny_sd import TinySDConfig, build_components

    unet = build_components(TinySDConfig(**TINY))["unet"]
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet


def _dp_worker(rank, world, port, out_dir):
    """One accelerate process training DP-SGD through the shim (--privacy dpsgd) on its half of each global batch."""
    torch.set_num_threads(1)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from accelerate import Accelerator
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from smplora_plugin.integrations.diffusers import PrivacyRegularizer, add_privacy_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--train_batch_size", type=int)
    parser.add_argument("--max_train_steps", type=int)
    args = add_privacy_args(parser).parse_args([
        "--privacy", "dpsgd", "--privacy_noise_multiplier", str(DP_SIGMA), "--privacy_max_grad_norm", str(DP_CLIP),
        "--privacy_seed", str(DP_SEED), "--train_batch_size", str(GLOBAL_BATCH // world), "--max_train_steps",
        str(STEPS)])
    accelerator = Accelerator(cpu=True)
    unet = _dp_unet()
    optimizer = torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=1.0)
    loader = torch.utils.data.DataLoader(list(range(DP_N)), batch_size=GLOBAL_BATCH // world)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    reg = PrivacyRegularizer.from_args(args)
    reg.attach(accelerator, None, model=unet, optimizer=optimizer, train_dataloader=loader)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, t, c, y = _dp_batch([step * GLOBAL_BATCH + j for j in range(rank * per, (rank + 1) * per)])
        with accelerator.accumulate(unet):
            pred = unet(x, t, c, return_dict=False)[0]
            n = reg.privacy_rows(per)
            loss = reg.step(F.mse_loss(pred.float(), y.float()), reg.features(pred, y, rows=n),
                            reg.nonmember_features(None, rows=n))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    result = {f"lora.{k}": v for k, v in get_peft_model_state_dict(accelerator.unwrap_model(unet)).items()}
    result["dp"] = torch.tensor([reg.dp.dp.steps, reg.dp.dp.expected_batch_size, reg.dp.dp.dataset_size])
    save_file({k: v.detach().contiguous().clone() for k, v in result.items()},
              os.path.join(out_dir, f"dp_rank{rank}.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_two_processes_dp_sgd_matches_the_single_process_mechanism(tmp_path):
    """--privacy dpsgd over two DDP ranks: the clipped per-sample sums are summed over the ranks before the one noise
    draw (the same seed on both), so both ranks hold the same LoRA, equal to DPGradients' loop on the global batch."""
    pytest.importorskip("opacus")
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from smplora_plugin.dp import DPGradients

    mp.start_processes(_dp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (load_file(str(tmp_path / f"dp_rank{r}.safetensors")) for r in (0, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _dp_unet()
        start = {k: v.clone() for k, v in get_peft_model_state_dict(ref).items()}
        dp = DPGradients(ref, noise_multiplier=DP_SIGMA, max_grad_norm=DP_CLIP, dataset_size=DP_N,
                         expected_batch_size=GLOBAL_BATCH, sampling="fixed_batch",
                         generator=torch.Generator().manual_seed(DP_SEED), method="loop")
        opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=1.0)
        for step in range(STEPS):
            dp.accumulate(lambda m, x, t, c, y: F.mse_loss(m(x, t, c, return_dict=False)[0].float(), y.float()),
                          *_dp_batch(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)))
            opt.zero_grad(set_to_none=True)
            dp.step()
            opt.step()
        single = get_peft_model_state_dict(ref)
    finally:
        torch.set_num_threads(threads)
    assert r0["dp"].tolist() == r1["dp"].tolist() == [STEPS, GLOBAL_BATCH, DP_N]
    keys = [k for k in r0 if k.startswith("lora.")]
    assert keys and set(r0) == set(r1)
    for k in keys:
        name = k[len("lora."):]
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
        torch.testing.assert_close(r0[k], single[name], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        assert bool((single[name] != start[name]).all())     # every weight moved
