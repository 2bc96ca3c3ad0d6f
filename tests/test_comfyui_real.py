"""The node pack in a real headless ComfyUI (skipped unless COMFYUI_DIR or COMFYUI_OLD_DIR is set).

Runs once per checkout set: ``COMFYUI_DIR`` (the current ComfyUI, tested at 783545f6) and
``COMFYUI_OLD_DIR`` (the older 3cd7b32f); the same example workflows must run on both.

Starts ``python main.py --cpu --listen 127.0.0.1 --port <free>`` with the pack linked into a
temporary ``custom_nodes`` folder and a small random SD1.x-style checkpoint
(scripts/comfyui/make_tiny_checkpoint.py, or COMFYUI_TINY_CHECKPOINT), posts the API-format
workflows of examples/comfyui/ to ``/prompt`` and reads ``/history``. The server is always
stopped by the test. COMFYUI_PYTHON names the Python that runs ComfyUI (default: this one).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _comfyui import write_pngs

CHECKOUTS = {name: os.environ[name] for name in ("COMFYUI_DIR", "COMFYUI_OLD_DIR") if os.environ.get(name)}
PY = os.environ.get("COMFYUI_PYTHON", sys.executable)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "comfyui"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHECKOUTS, reason="set COMFYUI_DIR (and COMFYUI_OLD_DIR) to ComfyUI checkouts")]
TIMINGS = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"/prompt refused the workflow: {exc.read().decode()[:2000]}") from exc


class Server:
    def __init__(self, comfy: str, base: Path, log: Path):
        self.comfy, self.base, self.log = comfy, base, log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [PY, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(base),
               "--disable-auto-launch"]
        self.proc = subprocess.Popen(cmd, cwd=comfy, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {self.proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                info = _get(f"{self.url}/object_info/SmploraTrainLora")
                if "SmploraTrainLora" in info:
                    break
                raise AssertionError(f"the node pack did not load:\n{log.read_text()[-4000:]}")
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() - t0 > 600:
                    raise AssertionError(f"ComfyUI did not start in 600 s:\n{log.read_text()[-4000:]}") from None
                time.sleep(1)
        self.timings = TIMINGS.setdefault(comfy, {})
        self.timings["server start (s)"] = round(time.time() - t0, 1)
        self.train_node = _get(f"{self.url}/object_info/TrainLoraNode")["TrainLoraNode"]

    def run(self, workflow: dict, name: str, timeout: float = 1800) -> dict:
        t0 = time.time()
        pid = _post(f"{self.url}/prompt", {"prompt": workflow, "client_id": "smplora-test"})["prompt_id"]
        while time.time() - t0 < timeout:
            try:
                hist = _get(f"{self.url}/history/{pid}")
            except (TimeoutError, urllib.error.URLError, ConnectionError):  # a busy server (training on a loaded CPU)
                if self.proc.poll() is not None:
                    log = self.log.read_text()[-4000:]
                    raise AssertionError(f"ComfyUI exited with {self.proc.returncode}:\n{log}") from None
                continue
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                self.timings[name + " (s)"] = round(time.time() - t0, 1)
                return hist[pid]
            time.sleep(1)
        raise AssertionError(f"workflow {name} did not finish in {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def _checkpoint(dest: Path, comfy: str) -> None:
    given = os.environ.get("COMFYUI_TINY_CHECKPOINT")
    if given:
        os.symlink(given, dest)
        return
    t0 = time.time()
    subprocess.run([PY, str(ROOT / "scripts" / "comfyui" / "make_tiny_checkpoint.py"), str(dest),
                    "--comfyui-dir", comfy],
                   check=True, capture_output=True)
    TIMINGS.setdefault(comfy, {})["make tiny checkpoint (s)"] = round(time.time() - t0, 1)


@pytest.fixture(scope="module", params=sorted(CHECKOUTS))
def server(tmp_path_factory, request):
    comfy = CHECKOUTS[request.param]
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    os.symlink(EXAMPLES / "custom_node", base / "custom_nodes" / "smplora")
    _checkpoint(base / "models" / "checkpoints" / "tiny_sd15.safetensors", comfy)
    write_pngs(base / "input" / "members", 8, seed=11, size=64)
    write_pngs(base / "input" / "holdout", 8, seed=12, size=64)
    srv = Server(comfy, base, base / "comfyui.log")
    try:
        yield srv
    finally:
        srv.stop()
        print("\nComfyUI real-run timings:", json.dumps(TIMINGS))


def _ok(result: dict, name: str) -> dict:
    status = result.get("status", {})
    assert status.get("status_str") == "success", f"{name} failed: {json.dumps(status)[:3000]}"
    return result["outputs"]


def _train_workflow(train_node: dict, **over) -> dict:
    """The example workflow (as shipped, for every supported ComfyUI), plus ComfyUI's own Train LoRA -> Save LoRA
    Weights on the same inputs for a plain LoRA; that node's inputs and output order are read from /object_info."""
    wf = json.loads((EXAMPLES / "smplora_train_save_api.json").read_text())
    wf["1"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"
    wf["6"]["inputs"].update(steps=4, gradient_checkpointing=False, **over)
    wf["7"]["inputs"]["prefix"] = "smplora/tiny"
    known = set(train_node["input"]["required"]) | set(train_node["input"].get("optional", {}))
    plain = {k: v for k, v in wf["6"]["inputs"].items() if k in known}
    outputs = list(train_node["output"])
    wf["9"] = {"class_type": "TrainLoraNode", "inputs": plain}  # ComfyUI's own node
    wf["10"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["9", outputs.index("LORA_MODEL")], "prefix": "plain/tiny",
                                                     "steps": ["9", outputs.index("INT")]}}
    return wf


def test_train_save_label_audit_in_real_comfyui(server):
    base = server.base
    # (a) checkpoint -> dataset latents/conditioning -> Train LoRA (SMP-LoRA) -> Save LoRA (SMP-LoRA)
    outputs = _ok(server.run(_train_workflow(server.train_node), "train+save (SMP-LoRA and plain)"), "train")
    smp = base / "models" / "loras" / "smplora" / "tiny_4_steps_00001_.safetensors"
    assert smp.is_file(), sorted(str(p) for p in base.rglob("*.safetensors"))
    assert "smplora/tiny_4_steps_00001_.safetensors" in outputs["7"]["text"][0]
    with safe_open(str(smp), framework="pt") as f:
        header, keys = f.metadata(), set(f.keys())
    assert header["smplora.method"] == "smp-lora"
    assert json.loads(header["smplora.config"])["calibrated"] is True
    assert json.loads(header["smplora.data"]) == {"members": 8, "nonmembers": 8, "steps": 4, "batch_size": 2,
                                                  "trainer": "comfyui"}
    assert json.loads(header["smplora.metrics"])["step"] == 4.0
    plain = next((base / "output" / "plain").glob("tiny_4_steps_*.safetensors"))
    with safe_open(str(plain), framework="pt") as f:
        assert set(f.keys()) == keys  # the same LoRA layout as ComfyUI's own Train LoRA
    shutil.copy(plain, base / "models" / "loras" / "plain_tiny.safetensors")

    # (b) LoRA privacy label on the SMP-LoRA file and on the plain one
    label_wf = {"1": {"class_type": "SmploraLoraPrivacyLabel",
                      "inputs": {"lora_name": "smplora/tiny_4_steps_00001_.safetensors"}},
                "2": {"class_type": "SmploraLoraPrivacyLabel", "inputs": {"lora_name": "plain_tiny.safetensors"}}}
    outputs = _ok(server.run(label_wf, "labels"), "labels")
    smp_label, plain_label = outputs["1"]["text"][0], outputs["2"]["text"][0]
    assert "trained with the membership-inference defense: smp-lora" in smp_label and "calibrated=True" in smp_label
    assert "no privacy information" in plain_label
    server.timings["label SMP-LoRA"] = smp_label.splitlines()[1]
    server.timings["label plain"] = plain_label.splitlines()[1][:60]

    # (c) Audit LoRA on it: report text (verdict or headline + table) and the ROC image
    wf = json.loads((EXAMPLES / "smplora_label_audit_api.json").read_text())
    wf["1"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"
    wf["2"]["inputs"]["lora_name"] = "smplora/tiny_4_steps_00001_.safetensors"
    wf["3"]["inputs"].update(lora_name="smplora/tiny_4_steps_00001_.safetensors", resolution=64,
                             member_folder=str(base / "input" / "members"),
                             nonmember_folder=str(base / "input" / "holdout"),
                             attacks=os.environ.get("COMFYUI_AUDIT_ATTACKS", ""))
    outputs = _ok(server.run(wf, "label+audit"), "audit")
    text = outputs["3"]["text"][0]
    assert ("Verdict:" in text or "max-attack AUC" in text) and "|" in text
    server.timings["audit headline"] = text.splitlines()[0]
    images = outputs["4"]["images"]
    assert len(images) == 1 and images[0]["filename"].endswith(".png")
    assert (base / "output" / "smplora_audit" / "tiny_4_steps_00001__seed0" / "report.json").is_file()


def test_bypass_mode_in_real_comfyui(server):
    """ComfyUI's bypass mode (a97c9806 and later): the same workflow with bypass_mode on trains and saves a LoRA
    with the same tensor keys; the robust preset's base prediction switches the bypassed layers off."""
    known = set(server.train_node["input"]["required"]) | set(server.train_node["input"].get("optional", {}))
    if "bypass_mode" not in known:
        pytest.skip("this ComfyUI's Train LoRA has no bypass mode (before a97c9806)")
    wf = _train_workflow(server.train_node, bypass_mode=True)
    wf["7"]["inputs"]["prefix"] = "smplora/bypass"
    for k in ("9", "10"):
        del wf[k]
    outputs = _ok(server.run(wf, "train+save, bypass mode"), "bypass")
    path = server.base / "models" / "loras" / "smplora" / "bypass_4_steps_00001_.safetensors"
    assert path.is_file() and "bypass_4_steps_00001_" in outputs["7"]["text"][0]
    with safe_open(str(path), framework="pt") as f:
        header, keys = f.metadata(), set(f.keys())
        ups = [f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")]
    weight_mode = server.base / "models" / "loras" / "smplora" / "tiny_4_steps_00001_.safetensors"
    if weight_mode.is_file():
        with safe_open(str(weight_mode), framework="pt") as f:
            assert set(f.keys()) == keys
    assert json.loads(header["smplora.metrics"])["step"] == 4.0
    assert ups and any(float(u.float().abs().sum()) > 0 for u in ups)


def test_bad_audit_input_is_a_node_error_and_writes_nothing(server):
    base = server.base
    before = sorted(p for p in (base / "output").rglob("*") if p.is_file())
    wf = json.loads((EXAMPLES / "smplora_label_audit_api.json").read_text())
    del wf["2"]
    wf["1"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"
    write_pngs(base / "input" / "few", 3, seed=13, size=64)
    lora = base / "models" / "loras" / "bad_input_case.safetensors"
    save_file({"diffusion_model.out.2.diff_b": torch.zeros(4)}, str(lora))  # any file in models/loras will do
    wf["3"]["inputs"].update(lora_name=lora.name,
                             member_folder=str(base / "input" / "members"),
                             nonmember_folder=str(base / "input" / "few"),
                             resolution=64)
    result = server.run(wf, "bad audit input")
    status = result["status"]
    assert status["status_str"] == "error"
    assert "needs at least 8" in json.dumps(status["messages"])
    after = sorted(p for p in (base / "output").rglob("*") if p.is_file())
    assert after == before


def test_dp_sgd_and_smp_with_dp_noise_in_real_comfyui(server):
    """DP noise in a real ComfyUI: the shipped DP-SGD workflow (batch_size 1, gradient accumulation as the DP
    batch, no held-out images) and SMP-LoRA + DP noise (in bypass mode where this ComfyUI has it) train and save
    LoRAs whose headers carry smplora.dp; batch_size 2 under DP is a node error with nothing written."""
    pytest.importorskip("opacus")  # the accountant, also needed in ComfyUI's Python (pip install 'smplora-plugin[dp]')
    base = server.base
    known = set(server.train_node["input"]["required"]) | set(server.train_node["input"].get("optional", {}))
    wf = json.loads((EXAMPLES / "smplora_train_dpsgd_api.json").read_text())
    wf["1"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"
    wf["6"]["inputs"].update(steps=3, grad_accumulation_steps=2, gradient_checkpointing=False)
    wf["7"]["inputs"]["prefix"] = "smplora/dpsgd"
    smp = json.loads((EXAMPLES / "smplora_train_save_api.json").read_text())
    wf["4"], wf["5"] = smp["4"], smp["5"]                       # held-out images for SMP-LoRA + DP noise
    wf["16"] = {"class_type": "SmploraTrainLora",
                "inputs": {**smp["6"]["inputs"], "steps": 3, "batch_size": 1, "grad_accumulation_steps": 2,
                           "gradient_checkpointing": False, "privacy_noise_multiplier": 1.0,
                           "privacy_max_grad_norm": 0.5, "bypass_mode": "bypass_mode" in known}}
    wf["17"] = {"class_type": "SmploraSaveLora", "inputs": {"lora": ["16", 0], "privacy": ["16", 3],
                                                            "prefix": "smplora/smpdp", "save_to": "models/loras",
                                                            "steps": ["16", 2]}}
    outputs = _ok(server.run(wf, "train+save, DP-SGD and SMP-LoRA + DP noise"), "dp")
    files = {}
    for node, stem in (("7", "dpsgd"), ("17", "smpdp")):
        path = base / "models" / "loras" / "smplora" / f"{stem}_3_steps_00001_.safetensors"
        assert path.is_file(), sorted(str(p) for p in base.rglob("*.safetensors"))
        text = outputs[node]["text"][0]
        assert "DP noise: " in text and "fixed-size batches do not satisfy" in text and "with replacement" in text
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()
            ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
            files[stem] = (header, set(f.keys()))
        entry = json.loads(header["smplora.dp"])
        assert (entry["steps"], entry["expected_batch_size"], entry["dataset_size"], entry["sampling"]) == \
            (3, 2.0, 8, "fixed_batch")
        assert entry["epsilon"] > 0 and ups and all(float(u.float().abs().sum()) > 0 for u in ups)
        server.timings[f"{stem} epsilon"] = entry["epsilon"]
        server.timings[f"{stem} header smplora.dp"] = header["smplora.dp"][:400]
    dp_header, smp_header = files["dpsgd"][0], files["smpdp"][0]
    assert dp_header["smplora.method"] == "dp-sgd" and json.loads(dp_header["smplora.dp"])["sigma"] == 1.0
    assert smp_header["smplora.method"] == "smp-lora" and json.loads(smp_header["smplora.dp"])["clip"] == 0.5
    assert json.loads(smp_header["smplora.dp"])["objective"] == "smp-lora + dp noise"
    assert files["dpsgd"][1] == files["smpdp"][1]   # the same LoRA layout

    before = sorted(p for d in ("output", "models/loras") for p in (base / d).rglob("*") if p.is_file())
    bad = json.loads((EXAMPLES / "smplora_train_dpsgd_api.json").read_text())
    bad["1"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"
    bad["6"]["inputs"].update(steps=3, batch_size=2)
    bad["7"]["inputs"]["prefix"] = "smplora/refused"
    result = server.run(bad, "DP with batch_size 2 (refused)")
    assert result["status"]["status_str"] == "error"
    assert "Set batch_size 1 and grad_accumulation_steps" in json.dumps(result["status"]["messages"])
    after = sorted(p for d in ("output", "models/loras") for p in (base / d).rglob("*") if p.is_file())
    assert after == before
