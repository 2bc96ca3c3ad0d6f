"""The LoRA-off base forward of calibrated features in kohya trainers, on the privacy rows only.

sd-scripts' ``get_noise_pred_and_target`` draws the noise and timesteps of a whole batch, builds the
denoiser's inputs (SD1/SD2: latents, timesteps, text states; SDXL: plus the added-condition vector;
SD3: plus pooled text; FLUX: image / text ids, guidance...), calls the denoiser (the ``unet`` argument:
a UNet or a DiT) and may post-process its output (SD3 / FLUX precondition it with the noisy input
and sigmas). The base prediction of calibrated features must be in that same post-processed space.

So the shim replays the call with the LoRA off and every RNG stream restored afterwards (the mixin),
and while it does, :func:`cut_forward` makes the denoiser run on the privacy rows only: every tensor
argument, positional or keyword, whose leading size is the batch size is cut to those rows, the
output is spread back to the whole batch (zeros on the other rows, which nobody reads), and the
trainer's own post-processing then acts on it as on the training forward. :func:`record_inputs`
captures the training forward's inputs, so the shim can check that the replay reached the very same
denoiser inputs on the rows it keeps.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch

Inputs = Tuple[tuple, dict]


def leading_size(tree: Any) -> Optional[int]:
    """Leading size of the first tensor (of at least one dimension) in ``tree``, depth first; ``None`` if none."""
    for leaf in tensors(tree):
        if leaf.ndim >= 1:
            return int(leaf.shape[0])
    return None


def tensors(tree: Any) -> List[torch.Tensor]:
    """Every tensor in ``tree`` (tensors, lists, tuples, dicts), depth first, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in tensors(item)]
    return []


def take_rows(tree: Any, idx: torch.Tensor, size: int) -> Any:
    """``tree`` with every tensor of leading size ``size`` cut to the rows ``idx`` (a new structure; the
    input is not changed). Tensors of another leading size, 0-dim tensors and non-tensors are kept."""
    if isinstance(tree, torch.Tensor):
        if tree.ndim >= 1 and tree.shape[0] == size:
            return tree.index_select(0, idx.to(tree.device))
        return tree
    return _rebuild(tree, lambda item: take_rows(item, idx, size))


def spread_rows(tree: Any, idx: torch.Tensor, size: int) -> Any:
    """Inverse of :func:`take_rows` for an output: every tensor of leading size ``len(idx)`` becomes a
    ``size``-row tensor holding it at the rows ``idx`` and zeros elsewhere."""
    n = int(idx.numel())
    if isinstance(tree, torch.Tensor):
        if tree.ndim >= 1 and tree.shape[0] == n:
            out = tree.new_zeros((size, *tree.shape[1:]))
            out.index_copy_(0, idx.to(tree.device), tree)
            return out
        return tree
    if not isinstance(tree, (list, tuple, dict)) and hasattr(tree, "__dict__") and tensors(list(vars(tree).values())):
        out = copy.copy(tree)   # an output object such as sd-scripts' SampleOutput(sample=...)
        for key, value in vars(tree).items():
            setattr(out, key, spread_rows(value, idx, size))
        return out
    return _rebuild(tree, lambda item: spread_rows(item, idx, size))


def _rebuild(tree: Any, fn) -> Any:
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):   # namedtuple
        return type(tree)(*(fn(item) for item in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(fn(item) for item in tree)
    if isinstance(tree, dict):
        items = {key: fn(value) for key, value in tree.items()}
        try:   # dict, OrderedDict, diffusers' BaseOutput (a dataclass over an OrderedDict)
            return type(tree)(**items) if all(isinstance(k, str) for k in items) else type(tree)(items)
        except TypeError:
            return items
    return tree


@contextmanager
def cut_forward(module: torch.nn.Module, rows: Sequence[int], size: int, record: List[Inputs]) -> Iterator[None]:
    """While active, every call of ``module`` whose first tensor argument has leading size ``size`` runs
    on the rows ``rows`` only (see the module docstring); the cut inputs are appended to ``record``.
    Calls of another size (e.g. sd-scripts' prior forward of DOP rows) run unchanged."""
    idx = torch.tensor(list(rows), dtype=torch.long)
    had_own = "forward" in vars(module)    # accelerate / torch.compile may have set an instance forward
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if leading_size((args, kwargs)) != size:
            return original(*args, **kwargs)
        args, kwargs = take_rows((args, kwargs), idx, size)
        record.append((args, kwargs))
        return spread_rows(original(*args, **kwargs), idx, size)

    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = original
        else:
            del module.forward


@contextmanager
def record_inputs(module: torch.nn.Module, size: int, record: List[Inputs]) -> Iterator[None]:
    """While active, the inputs of every call of ``module`` of leading size ``size`` are appended to ``record``."""
    def hook(_module, args, kwargs):
        if leading_size((args, kwargs)) == size:
            record.append((args, kwargs))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def same_inputs(cut: List[Inputs], full: List[Inputs], rows: Sequence[int], size: int) -> bool:
    """Whether the replay's cut denoiser inputs are the training forward's inputs on ``rows``, call by call."""
    if len(cut) != len(full):
        return False
    idx = torch.tensor(list(rows), dtype=torch.long)
    for got, want in zip(cut, full):
        a, b = tensors(got), tensors(take_rows(want, idx, size))
        if len(a) != len(b) or not all(x.shape == y.shape and torch.equal(x, y.to(x.device)) for x, y in zip(a, b)):
            return False
    return True
