"""The stand-in and the node pack against ComfyUI's real source (read with ``ast``).

Runs on each checkout named by ``COMFYUI_DIR`` (the current ComfyUI, 783545f6) and
``COMFYUI_OLD_DIR`` (the older 3cd7b32f), skipped when neither is set. A checkout's Train LoRA
inputs pick the stand-in layout it must match (``tests/_comfyui.py:LAYOUTS``); every ComfyUI
function the pack calls, or the stand-in imitates, must exist there with the parameter names of
that layout's stand-in, so the CI tests against the stand-in exercise the calls the real ComfyUI
receives. A checkout that matches no layout fails: the pack or its stand-in needs an update.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
from pathlib import Path
from typing import List, Optional

import pytest

from _comfyui import LAYOUTS, StandinComfy

CHECKOUTS = {name: os.environ[name] for name in ("COMFYUI_DIR", "COMFYUI_OLD_DIR") if os.environ.get(name)}
pytestmark = pytest.mark.skipif(not CHECKOUTS, reason="set COMFYUI_DIR (and COMFYUI_OLD_DIR) to ComfyUI checkouts")
# Signatures outside nodes_train that differ between the supported commits (the stand-in follows the newest).
OLDER_SIGNATURES = {
    ("3cd7b32f", "comfy/sd.py:load_lora_for_models"): ["model", "clip", "lora", "strength_model", "strength_clip"],
}

# (file, qualified name, stand-in "module:qualname" that must match exactly, or the parameters the pack passes)
FUNCTIONS = [
    ("comfy_extras/nodes_train.py", "TrainSampler.__init__", "comfy_extras.nodes_train:TrainSampler.__init__"),
    ("comfy_extras/nodes_train.py", "TrainSampler.fwd_bwd", "comfy_extras.nodes_train:TrainSampler.fwd_bwd"),
    ("comfy_extras/nodes_train.py", "TrainSampler._train_step_standard_mode",
     "comfy_extras.nodes_train:TrainSampler._train_step_standard_mode"),
    ("comfy_extras/nodes_train.py", "TrainSampler._train_step_bucket_mode",
     "comfy_extras.nodes_train:TrainSampler._train_step_bucket_mode"),
    ("comfy_extras/nodes_train.py", "TrainSampler.sample", "comfy_extras.nodes_train:TrainSampler.sample"),
    ("comfy_extras/nodes_train.py", "TrainLoraNode.execute", "comfy_extras.nodes_train:TrainLoraNode.execute"),
    ("comfy_extras/nodes_train.py", "make_batch_extra_option_dict",
     "comfy_extras.nodes_train:make_batch_extra_option_dict"),
    ("comfy_extras/nodes_custom_sampler.py", "Guider_Basic.set_conds",
     "comfy_extras.nodes_train:TrainGuider.set_conds"),
    ("comfy/samplers.py", "CFGGuider.inner_set_conds", "comfy_extras.nodes_train:TrainGuider.inner_set_conds"),
    ("folder_paths.py", "get_save_image_path", "folder_paths:get_save_image_path"),
    ("folder_paths.py", "get_filename_list", "folder_paths:get_filename_list"),
    ("folder_paths.py", "get_full_path_or_raise", "folder_paths:get_full_path_or_raise"),
    ("folder_paths.py", "get_folder_paths", "folder_paths:get_folder_paths"),
    ("folder_paths.py", "get_output_directory", "folder_paths:get_output_directory"),
    ("comfy/sd.py", "load_lora_for_models", "comfy.sd:load_lora_for_models"),
    ("comfy/lora.py", "model_lora_keys_unet", "comfy.lora:model_lora_keys_unet"),
    ("comfy/lora.py", "model_lora_keys_clip", "comfy.lora:model_lora_keys_clip"),
    ("comfy/lora.py", "load_lora", "comfy.lora:load_lora"),
    ("comfy/lora_convert.py", "convert_lora", "comfy.lora_convert:convert_lora"),
    ("comfy/model_management.py", "load_models_gpu", "comfy.model_management:load_models_gpu"),
    ("comfy/utils.py", "load_torch_file", "comfy.utils:load_torch_file"),
    ("comfy/model_base.py", "BaseModel.apply_model", "comfy.standin_model:BaseModel.apply_model"),
    ("comfy/model_base.py", "BaseModel.extra_conds", ["self", "**kwargs"]),
    ("comfy/model_base.py", "BaseModel.process_latent_in", "comfy.standin_model:BaseModel.process_latent_in"),
    ("comfy/model_sampling.py", "EPS.noise_scaling", "comfy.standin_model:ModelSamplingDiscrete.noise_scaling"),
    ("comfy/model_sampling.py", "ModelSamplingDiscrete.percent_to_sigma",
     "comfy.standin_model:ModelSamplingDiscrete.percent_to_sigma"),
    ("comfy/conds.py", "CONDRegular.process_cond", ["self", "batch_size", "**kwargs"]),
    ("comfy/model_patcher.py", "ModelPatcher.add_weight_wrapper",
     "comfy.standin_model:ModelPatcher.add_weight_wrapper"),
    ("comfy/sd.py", "CLIP.tokenize", "comfy.standin_model:CLIP.tokenize"),
    ("comfy/sd.py", "CLIP.encode_from_tokens", "comfy.standin_model:CLIP.encode_from_tokens"),
    ("comfy/sd.py", "VAE.encode", "comfy.standin_model:VAE.encode"),
    ("comfy_api/latest/_io.py", "NodeOutput.__init__", "comfy_api.latest.io:NodeOutput.__init__"),
    ("comfy_api/latest/_ui.py", "PreviewText.__init__", "comfy_api.latest.ui:PreviewText.__init__"),
]


def _params(fn: ast.FunctionDef) -> List[str]:
    a = fn.args
    out = [x.arg for x in a.posonlyargs + a.args]
    if a.vararg:
        out.append("*" + a.vararg.arg)
    out += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        out.append("**" + a.kwarg.arg)
    return out


def _find(path: Path, qualname: str) -> Optional[ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    scope: List[ast.AST] = tree.body
    *classes, name = qualname.split(".")
    for cls in classes:
        node = next((n for n in scope if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if node is None:
            return None
        scope = node.body
    return next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)


def _standin_params(spec: str) -> List[str]:
    module, qual = spec.split(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    out = []
    for p in inspect.signature(obj).parameters.values():
        out.append({p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name)
    if qual.split(".")[-1] != qual and not out[:1] == ["self"] and not isinstance(
            inspect.getattr_static(getattr(importlib.import_module(module), qual.split(".")[0]), qual.split(".")[-1]),
            (classmethod, staticmethod)):
        out.insert(0, "self")
    return out


@pytest.fixture(scope="module", params=sorted(CHECKOUTS))
def checkout(request, tmp_path_factory):
    """``(ComfyUI folder, the stand-in at the layout whose Train LoRA inputs that folder has)``."""
    root = Path(CHECKOUTS[request.param])
    real = _schema_inputs(root / "comfy_extras" / "nodes_train.py", "TrainLoraNode")
    seen = {}
    for layout in LAYOUTS:
        env = StandinComfy(tmp_path_factory.mktemp(f"standin_{layout}"), layout=layout)
        try:
            seen[layout] = [i.id for i in env.nodes_train.TrainLoraNode.define_schema().inputs]
        finally:
            env.close()
    match = [layout for layout, ids in seen.items() if ids == real]
    assert match, (f"{request.param}={root}: its Train LoRA inputs {real} match no supported layout {seen}; "
                   "the node pack and its stand-in need an update for this ComfyUI")
    env = StandinComfy(tmp_path_factory.mktemp("standin"), layout=match[0])
    try:
        yield root, env
    finally:
        env.close()


@pytest.mark.parametrize("path, qualname, expected", FUNCTIONS, ids=[f"{p}:{q}" for p, q, _ in FUNCTIONS])
def test_signature_matches_comfyui(checkout, path, qualname, expected):
    root, env = checkout
    fn = _find(root / path, qualname)
    assert fn is not None, f"{qualname} is gone from {path}: the node pack or its stand-in needs an update"
    real = _params(fn)
    older = OLDER_SIGNATURES.get((env.layout, f"{path}:{qualname}"))
    if older is not None:
        assert real == older
    elif isinstance(expected, str):
        stand = _standin_params(expected)
        if qualname.endswith("execute") or qualname.endswith("define_schema"):
            real = [p for p in real if p != "cls"]
            stand = [p for p in stand if p not in ("cls", "self")]
        assert stand == real, f"stand-in {expected} ({env.layout}) has {stand}, ComfyUI's {qualname} has {real}"
    else:
        assert real == expected


def test_train_lora_outputs_match_the_layout(checkout):
    """The output types of the checkout's Train LoRA, in order, are those of the matching stand-in layout."""
    root, env = checkout
    fn = _find(root / "comfy_extras" / "nodes_train.py", "TrainLoraNode.define_schema")
    outputs = next(k.value for n in ast.walk(fn) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "outputs")
    real = []
    for call in outputs.elts:  # io.Model.Output(...), io.Custom("LORA_MODEL").Output(...), io.Int.Output(...)
        owner = call.func.value
        real.append(owner.args[0].value if isinstance(owner, ast.Call) else owner.attr.upper())
    stand = [o.io_type for o in env.nodes_train.TrainLoraNode.define_schema().outputs]
    assert real == stand, f"{root}: Train LoRA outputs {real}, the {env.layout} stand-in has {stand}"


def _schema_inputs(path: Path, cls: str) -> List[str]:
    fn = _find(path, f"{cls}.define_schema")
    names = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Input" \
                and node.args and isinstance(node.args[0], ast.Constant):
            names.append(node.args[0].value)
    return names


def test_train_lora_inputs_match_comfyui(checkout):
    root, env = checkout
    real = _schema_inputs(root / "comfy_extras" / "nodes_train.py", "TrainLoraNode")
    stand = [i.id for i in env.nodes_train.TrainLoraNode.define_schema().inputs]
    assert stand == real


def test_bypass_hook_has_what_lora_off_reads(checkout):
    """Bypass mode (a97c9806 and later): the hook keeps ``original_forward`` and ``adapter`` and sets ``forward``."""
    root, env = checkout
    path = root / "comfy" / "weight_adapter" / "bypass.py"
    if env.layout == "3cd7b32f":
        assert not path.exists() or "class BypassForwardHook" not in path.read_text(encoding="utf-8")
        return
    src = path.read_text(encoding="utf-8")
    assert "class BypassForwardHook" in src
    inject = _find(path, "BypassForwardHook.inject")
    text = ast.unparse(inject)
    assert "self.original_forward = self.module.forward" in text
    assert "self.module.forward = self._bypass_forward" in text
    init = ast.unparse(_find(path, "BypassForwardHook.__init__"))
    assert "self.adapter = adapter" in init


def test_node_api_names_exist(checkout):
    COMFY = str(checkout[0])
    io_src = ast.parse((Path(COMFY) / "comfy_api" / "latest" / "_io.py").read_text(encoding="utf-8"))
    names = {n.name for n in io_src.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert {"Schema", "ComfyNode", "NodeOutput", "Custom", "Boolean", "Int", "Float", "String", "Combo", "Image",
            "Latent", "Conditioning", "Clip", "Vae", "Model"} <= names
    schema = next(n for n in io_src.body if isinstance(n, ast.ClassDef) and n.name == "Schema")
    fields = {s.target.id for s in schema.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    assert {"node_id", "display_name", "category", "inputs", "outputs", "description", "is_input_list",
            "is_output_node", "is_experimental"} <= fields
    init = (Path(COMFY) / "comfy_api" / "latest" / "__init__.py").read_text(encoding="utf-8")
    assert "class ComfyExtension" in init and "_io_public as io" in init and "_ui_public as ui" in init
    nodes_py = (Path(COMFY) / "nodes.py").read_text(encoding="utf-8")
    assert 'hasattr(module, "comfy_entrypoint")' in nodes_py  # how custom-node modules expose V3 nodes
    assert 'unique_id = "UNIQUE_ID"' in (Path(COMFY) / "comfy_api" / "latest" / "_io.py").read_text(encoding="utf-8")
    server = ast.parse((Path(COMFY) / "server.py").read_text(encoding="utf-8"))
    prompt_server = next(n for n in server.body if isinstance(n, ast.ClassDef) and n.name == "PromptServer")
    send = next(n for n in prompt_server.body if isinstance(n, ast.FunctionDef) and n.name == "send_progress_text")
    assert _params(send)[:3] == ["self", "text", "node_id"]
    sampling = (Path(COMFY) / "comfy" / "model_sampling.py").read_text(encoding="utf-8")
    assert "self.register_buffer('sigmas'" in sampling
