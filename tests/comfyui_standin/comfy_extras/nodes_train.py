"""Stand-in of comfy_extras/nodes_train.py at ComfyUI 783545f6: the names, signatures and call order the pack uses.

``TrainLoraNode.execute`` clones the model, attaches a trainable adapter to every layer with a
``weight_function`` (``<layer>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``, and a bias
difference ``<layer>.diff_b``), builds the optimiser and loss, then runs
``TrainGuider(mp).set_conds(positive)`` and ``guider.sample(...)``, which calls
``TrainSampler.sample``; each step calls ``_train_step_standard_mode`` -> ``fwd_bwd`` ->
``loss_fn(x0_pred, x0)``, as ComfyUI does. Since a97c9806 the node returns ``(lora, loss_map, steps)``
and can apply the adapters in bypass mode (a hook object replaces each layer's ``forward`` with
``f(x) + h(x)``); fp16 training goes through a GradScaler, and gradients are cast to the
parameters' dtype before the optimiser step. ``nodes_train_3cd7b32f`` holds the older layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

PBARS = []  # every progress bar the stand-in made (tests read their postfixes)
SAMPLERS = []  # every sampler the stand-in made (tests read their grad scalers)


class _Pbar:
    def __init__(self, total):
        self.total = total
        self.postfixes = []
        PBARS.append(self)

    def __iter__(self):
        return iter(range(self.total))

    def set_postfix(self, d):
        self.postfixes.append(dict(d))


class _Noise:
    def __init__(self, seed):
        self.seed = seed

    def generate_noise(self, input_latent):
        x = input_latent["samples"]
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(self.seed)).to(x.dtype)


def make_batch_extra_option_dict(d, indicies, full_size=None):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = make_batch_extra_option_dict(v, indicies, full_size=full_size)
        elif torch.is_tensor(v) and (full_size is None or v.size(0) == full_size):
            out[k] = v[indicies]
        else:
            out[k] = v
    return out


class TrainGuider:
    def __init__(self, model_patcher, offloading=False):
        self.model_patcher = model_patcher
        self.offloading = offloading
        self.original_conds = {}
        self.conds = {}

    def set_conds(self, positive):
        self.inner_set_conds({"positive": positive})

    def inner_set_conds(self, conds):
        for k, v in conds.items():  # [[cross_attn, {...}], ...] -> [{"cross_attn": ...}, ...]
            self.original_conds[k] = [{"cross_attn": c[0], **c[1]} for c in v]

    def __call__(self, x, sigma, model_options=None, seed=None):
        model = self.inner_model
        outs = [model.apply_model(x, sigma, c_crossattn=c["cross_attn"].to(x.dtype).expand(x.shape[0], -1, -1))
                for c in self.conds["positive"]]
        return torch.stack(outs).mean(0)  # every cond applies to the whole batch, averaged (as ComfyUI)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        comfy.model_management.load_models_gpu([self.model_patcher], force_full_load=not self.offloading)
        self.inner_model = self.model_patcher.model
        self.conds = {k: [dict(c) for c in v] for k, v in self.original_conds.items()}
        latent_image = self.inner_model.process_latent_in(latent_image)
        extra_args = {"model_options": self.model_patcher.model_options, "seed": seed}
        return sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


class TrainSampler:
    def __init__(self, loss_fn, optimizer, loss_callback=None, batch_size=1, grad_acc=1, total_steps=1, seed=0,
                 training_dtype=torch.bfloat16, real_dataset=None, bucket_latents=None, use_grad_scaler=False):
        self.loss_fn, self.optimizer, self.loss_callback = loss_fn, optimizer, loss_callback
        self.batch_size, self.grad_acc, self.total_steps, self.seed = batch_size, grad_acc, total_steps, seed
        self.training_dtype = training_dtype
        self.bucket_latents = bucket_latents
        self.grad_scaler = torch.amp.GradScaler("cpu") if use_grad_scaler else None
        SAMPLERS.append(self)

    def fwd_bwd(self, model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args, dataset_size,
                bwd=True):
        sampling = model_wrap.inner_model.model_sampling
        xt = sampling.noise_scaling(batch_sigmas, batch_noise, batch_latent, False)
        x0 = sampling.noise_scaling(torch.zeros_like(batch_sigmas), torch.zeros_like(batch_noise), batch_latent, False)
        model_wrap.conds["positive"] = [cond[i] for i in indicies]
        extra = make_batch_extra_option_dict(extra_args, indicies, full_size=dataset_size)
        with torch.autocast(xt.device.type, dtype=self.training_dtype, enabled=self.training_dtype != torch.float32):
            x0_pred = model_wrap(xt.requires_grad_(True), batch_sigmas.requires_grad_(True), **extra)
            loss = self.loss_fn(x0_pred.float(), x0.float())
        if bwd:
            bwd_loss = loss / self.grad_acc
            (bwd_loss if self.grad_scaler is None else self.grad_scaler.scale(bwd_loss)).backward()
        return loss

    def _generate_batch_sigmas(self, model_wrap, batch_size, device):
        sampling = model_wrap.inner_model.model_sampling
        return torch.tensor([sampling.percent_to_sigma(torch.rand((1,)).item()) for _ in range(batch_size)]).to(device)

    def _train_step_bucket_mode(self, model_wrap, cond, extra_args, noisegen, latent_image, pbar):
        sizes = torch.tensor([float(b.shape[0]) for b in self.bucket_latents])
        bucket = int(torch.multinomial(sizes, 1).item())
        offset = int(sizes[:bucket].sum().item())
        chosen = torch.randperm(self.bucket_latents[bucket].shape[0])[: self.batch_size].tolist()
        batch_latent = self.bucket_latents[bucket][chosen].to(latent_image)
        batch_noise = noisegen.generate_noise({"samples": batch_latent})
        batch_sigmas = self._generate_batch_sigmas(model_wrap, len(chosen), batch_latent.device)
        loss = self.fwd_bwd(model_wrap, batch_sigmas, batch_noise, batch_latent, cond, [offset + i for i in chosen],
                            extra_args, int(sizes.sum().item()), bwd=True)
        if self.loss_callback:
            self.loss_callback(loss.item())
        pbar.set_postfix({"loss": f"{loss.item():.4f}", "bucket": bucket})

    def _train_step_standard_mode(self, model_wrap, cond, extra_args, noisegen, latent_image, dataset_size, pbar):
        indicies = torch.randperm(dataset_size)[: self.batch_size].tolist()
        batch_latent = torch.stack([latent_image[i] for i in indicies])
        batch_noise = noisegen.generate_noise({"samples": batch_latent})
        batch_sigmas = self._generate_batch_sigmas(model_wrap, len(indicies), batch_latent.device)
        loss = self.fwd_bwd(model_wrap, batch_sigmas, batch_noise, batch_latent, cond, indicies, extra_args,
                            dataset_size, bwd=True)
        if self.loss_callback:
            self.loss_callback(loss.item())
        pbar.set_postfix({"loss": f"{loss.item():.4f}"})

    def _optimizer_step(self):
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        for group in self.optimizer.param_groups:  # gradients in the parameters' dtype (since a97c9806)
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.data = p.grad.data.to(p.data.dtype)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        cond = model_wrap.conds["positive"]
        dataset_size = sigmas.size(0)
        pbar = _Pbar(self.total_steps)
        for i in pbar:
            noisegen = _Noise(self.seed + i * 1000)
            if self.bucket_latents is not None:
                self._train_step_bucket_mode(model_wrap, cond, extra_args, noisegen, latent_image, pbar)
            else:
                self._train_step_standard_mode(model_wrap, cond, extra_args, noisegen, latent_image, dataset_size, pbar)
            if (i + 1) % self.grad_acc == 0:
                self._optimizer_step()
        return torch.zeros_like(latent_image)


class _TrainAdapter(torch.nn.Module):
    def __init__(self, weight, rank, generator):
        super().__init__()
        out_dim, in_dim = weight.shape[0], weight[0].numel()
        self.lora_up = torch.nn.Linear(rank, out_dim, bias=False)
        self.lora_down = torch.nn.Linear(in_dim, rank, bias=False)
        with torch.no_grad():
            self.lora_up.weight.zero_()
            self.lora_down.weight.copy_(torch.randn(rank, in_dim, generator=generator) / in_dim ** 0.5)
        self.alpha = torch.nn.Parameter(torch.tensor(float(rank)), requires_grad=False)

    def delta(self, shape):
        return (self.lora_up.weight.float() @ self.lora_down.weight.float()).view(shape)

    def __call__(self, w):  # weight mode: W + up @ down
        return w + self.delta(w.shape).to(w.dtype)

    def h(self, layer, x):  # bypass mode: the adapter's own output, added to the layer's
        d = self.delta(layer.weight.shape).to(x.dtype)
        if d.ndim == 4:
            return F.conv2d(x, d, None, padding=layer.padding)
        return F.linear(x, d)


class _BypassHook:
    """Bypass mode: the layer's ``forward`` becomes ``f(x) + h(x)``; the hook keeps ``original_forward``."""

    def __init__(self, module, adapter):
        self.module, self.adapter, self.original_forward = module, adapter, None

    def _bypass_forward(self, x, *args, **kwargs):
        return self.original_forward(x, *args, **kwargs) + self.adapter.h(self.module, x)

    def inject(self):
        self.original_forward = self.module.forward
        self.module.forward = self._bypass_forward

    def eject(self):
        self.module.forward = self.original_forward
        self.original_forward = None


class _BiasDiff(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.bias = bias

    def __call__(self, b):
        return (b.to(self.bias) + self.bias).to(b.dtype)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def train(model, latents, positive, batch_size, steps, grad_accumulation_steps, learning_rate, rank, optimizer,
          loss_function, seed, training_dtype, lora_dtype, existing_lora, bucket_mode, bypass_mode=False,
          offloading=False, sampler_kwargs=None):
    """Train LoRA's work, shared by both layouts: ``(patcher, lora_sd, loss_map)``."""
    mp = model.clone()
    ldtype = DTYPES[lora_dtype]
    grad_scaler = False
    if training_dtype == "none":  # the model's own dtype; fp16 with fp16 LoRA weights gets a GradScaler
        dtype = mp.model_dtype() if mp.model_dtype() == torch.float16 else torch.bfloat16
        grad_scaler = dtype == torch.float16 and ldtype != torch.bfloat16
    else:
        dtype = DTYPES[training_dtype]
    if bucket_mode:
        lat = [x["samples"].to(dtype) for x in latents]
        n = sum(b.shape[0] for b in lat)
        pos = [c for group in positive for c in group]
    else:
        lat = torch.cat([x["samples"] for x in latents]).to(dtype)
        n = lat.shape[0]
        pos = positive[0] if len(positive) == 1 else [c for group in positive for c in group]
        if len(pos) == 1:
            pos = pos * n
        if len(pos) != n:
            raise ValueError(f"Number of positive conditions ({len(pos)}) does not match number of images ({n}).")
    gen = torch.Generator().manual_seed(seed)
    lora_sd, hooks = {}, []
    with torch.inference_mode(False):
        mp.model.requires_grad_(False).train()
        for name, m in mp.model.named_modules():
            if hasattr(m, "weight_function"):
                adapter = _TrainAdapter(m.weight, rank, gen).to(ldtype).train()
                adapter.lora_up.requires_grad_(True), adapter.lora_down.requires_grad_(True)
                for pname, p in adapter.named_parameters():
                    lora_sd[f"{name}.{pname}"] = p
                if bypass_mode:
                    hooks.append(_BypassHook(m, adapter))
                else:
                    mp.add_weight_wrapper(f"{name}.weight", adapter)
                bias = torch.nn.Parameter(torch.zeros(m.bias.shape, dtype=ldtype))
                lora_sd[f"{name}.diff_b"] = bias
                mp.add_weight_wrapper(f"{name}.bias", _BiasDiff(bias))
        params = [p for p in lora_sd.values() if p.requires_grad]
        opt = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD,
               "RMSprop": torch.optim.RMSprop}[optimizer](params, lr=learning_rate)
        criterion = {"MSE": torch.nn.MSELoss(), "L1": torch.nn.L1Loss(), "Huber": torch.nn.HuberLoss(),
                     "SmoothL1": torch.nn.SmoothL1Loss()}[loss_function]
        comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=not offloading)
        loss_map = {"loss": []}
        extra = dict(sampler_kwargs or {})
        if grad_scaler:
            extra["use_grad_scaler"] = True
        sampler = TrainSampler(criterion, opt, loss_callback=loss_map["loss"].append, batch_size=batch_size,
                               grad_acc=grad_accumulation_steps, total_steps=steps * grad_accumulation_steps,
                               seed=seed, training_dtype=dtype, real_dataset=None,
                               bucket_latents=lat if bucket_mode else None, **extra)
        guider = TrainGuider(mp, **({"offloading": offloading} if offloading else {}))
        guider.set_conds(pos)
        for hook in hooks:
            hook.inject()
        try:
            dummy = lat[0][:1].repeat(n, 1, 1, 1) if bucket_mode else lat
            noise = _Noise(seed)
            guider.sample(noise.generate_noise({"samples": dummy}), dummy, sampler, torch.tensor(range(n)), seed=seed)
        finally:
            for hook in hooks:
                hook.eject()
        for k in lora_sd:
            lora_sd[k] = lora_sd[k].detach().to(ldtype)
    return mp, lora_sd, loss_map


class TrainLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainLoraNode", display_name="Train LoRA", category="model/training", is_experimental=True,
            is_input_list=True,
            inputs=[
                io.Model.Input("model"), io.Latent.Input("latents"), io.Conditioning.Input("positive"),
                io.Int.Input("batch_size", default=1), io.Int.Input("grad_accumulation_steps", default=1),
                io.Int.Input("steps", default=16), io.Float.Input("learning_rate", default=0.0005),
                io.Int.Input("rank", default=8),
                io.Combo.Input("optimizer", options=["AdamW", "Adam", "SGD", "RMSprop"], default="AdamW"),
                io.Combo.Input("loss_function", options=["MSE", "L1", "Huber", "SmoothL1"], default="MSE"),
                io.Int.Input("seed", default=0),
                io.Combo.Input("training_dtype", options=["bf16", "fp32", "none"], default="bf16"),
                io.Combo.Input("lora_dtype", options=["bf16", "fp32"], default="bf16"),
                io.Boolean.Input("quantized_backward", default=False),
                io.Combo.Input("algorithm", options=["LoRA"], default="LoRA"),
                io.Boolean.Input("gradient_checkpointing", default=True),
                io.Int.Input("checkpoint_depth", default=1),
                io.Boolean.Input("offloading", default=False),
                io.Combo.Input("existing_lora", options=["[None]"], default="[None]"),
                io.Boolean.Input("bucket_mode", default=False),
                io.Boolean.Input("bypass_mode", default=False),
            ],
            outputs=[io.Custom("LORA_MODEL").Output(display_name="lora"),
                     io.Custom("LOSS_MAP").Output(display_name="loss_map"), io.Int.Output(display_name="steps")],
        )

    @classmethod
    def execute(cls, model, latents, positive, batch_size, steps, grad_accumulation_steps, learning_rate, rank,
                optimizer, loss_function, seed, training_dtype, lora_dtype, quantized_backward, algorithm,
                gradient_checkpointing, checkpoint_depth, offloading, existing_lora, bucket_mode, bypass_mode):
        comfy.model_management.training_fp8_bwd = quantized_backward[0]
        _, lora_sd, loss_map = train(model[0], latents, positive, batch_size[0], steps[0], grad_accumulation_steps[0],
                                     learning_rate[0], rank[0], optimizer[0], loss_function[0], seed[0],
                                     training_dtype[0], lora_dtype[0], existing_lora[0], bucket_mode[0],
                                     bypass_mode=bypass_mode[0], offloading=offloading[0])
        return io.NodeOutput(lora_sd, loss_map, steps[0])
