"""``smplora-kohya``: run a kohya sd-scripts LoRA trainer with SMP-LoRA switched on.

    smplora-kohya [--sd_scripts DIR] train_network.py <your usual kohya args> --privacy smplora ...
    python -m smplora_plugin.integrations.kohya [--sd_scripts DIR] sdxl_train_network.py ...
    accelerate launch [accelerate args] -m smplora_plugin.integrations.kohya train_network.py ...

The launcher finds sd-scripts (``--sd_scripts DIR``, else ``$SD_SCRIPTS_DIR``, else the folder
of the script path given, else the current folder), imports the trainer script as a module,
checks its trainer class has the hooks SMP-LoRA needs (sd-scripts >= v0.10.0) and, from the source,
the other pieces of sd-scripts it reaches into (:mod:`.reach`), extends the
script's own ``setup_parser()`` with the ``--privacy*`` options, and runs the script's own
``if __name__ == "__main__":`` block with the trainer class replaced by ``(SmploraTrainerMixin,
TrainerClass)``. Nothing of sd-scripts is copied or patched on disk.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from smplora_plugin import __version__
from smplora_plugin.errors import SmploraError

from . import reach
from .compat import KohyaVersionError, check_trainer_class, find_trainer_class, static_check
from .options import add_privacy_arguments
from .trainer import private_trainer_class

USAGE = """usage: smplora-kohya [--sd_scripts DIR] SCRIPT [kohya arguments ...] --privacy smplora [--privacy_* ...]

Run a kohya sd-scripts LoRA trainer (train_network.py, sdxl_train_network.py, flux_train_network.py,
sd3_train_network.py, ...) with the SMP-LoRA membership-inference defense, DP-SGD, or both.

  --sd_scripts DIR   your sd-scripts checkout (default: $SD_SCRIPTS_DIR, the script's folder, or the
                     current folder); needs sd-scripts v0.10.0 or newer
  SCRIPT             the trainer script, by name or path (e.g. train_network.py)

Privacy options (also accepted in the --config_file TOML, e.g. in a [smplora] section):
  --privacy {none,smplora,mplora,dpsgd}  --privacy_preset {paper,robust}  --[no-]privacy_calibrated
  --privacy_alpha A  --privacy_beta B  --privacy_delta D
  --privacy_k_steps K  --privacy_attacker_lr LR  --privacy_attacker_weight_decay WD
  --privacy_attacker_hidden 512,256  --privacy_attacker_dropout P  --privacy_feature_grid 16
  --privacy_nonmember_every N  --privacy_fraction F  --privacy_seed S  --privacy_holdout_dir DIR
  --privacy_manifest FILE  --privacy_attacker_state FILE
DP noise (--privacy dpsgd alone, or with smplora / mplora): --privacy_noise_multiplier SIGMA
  --privacy_target_epsilon EPS  --privacy_max_grad_norm C  --privacy_dp_delta D  --privacy_dp_accountant {rdp,prv}
Non-members come from --privacy_holdout_dir (kohya folder layout) or kohya's validation split.
`smplora-kohya SCRIPT --help` lists every option of the script, the privacy ones included.
"""


class LauncherError(SmploraError):
    """The launcher cannot find or use the sd-scripts checkout / script."""


def split_argv(argv: Sequence[str]) -> Tuple[Optional[str], Optional[str], List[str]]:
    """(sd_scripts dir or None, script or None, the kohya arguments)."""
    argv = list(argv)
    sd_dir = None
    rest: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--sd_scripts", "--sd-scripts"):
            if i + 1 >= len(argv):
                raise LauncherError(f"{a} needs a folder: --sd_scripts /path/to/sd-scripts")
            sd_dir = argv[i + 1]
            i += 2
            continue
        if a.startswith(("--sd_scripts=", "--sd-scripts=")):
            sd_dir = a.split("=", 1)[1]
            i += 1
            continue
        rest.append(a)
        i += 1
    script = None
    for j, a in enumerate(rest):
        if not a.startswith("-"):
            script = a
            rest = rest[:j] + rest[j + 1:]
            break
        if a in ("-h", "--help", "--version"):
            break
    return sd_dir, script, rest


def find_sd_scripts(sd_dir: Optional[str], script: str) -> Tuple[Path, Path]:
    """(sd-scripts root, script path)."""
    script_path = Path(script).expanduser()
    candidates: List[Tuple[str, Path]] = []
    if sd_dir:
        candidates.append(("--sd_scripts", Path(sd_dir).expanduser()))
    elif os.environ.get("SD_SCRIPTS_DIR"):
        candidates.append(("SD_SCRIPTS_DIR", Path(os.environ["SD_SCRIPTS_DIR"]).expanduser()))
    elif script_path.parent != Path("") and script_path.is_file():
        candidates.append(("the script's folder", script_path.resolve().parent))
    else:
        candidates.append(("the current folder", Path.cwd()))
    how, root = candidates[0]
    root = root.resolve()
    if not (root / "library").is_dir():
        raise LauncherError(
            f"{root} ({how}) is not an sd-scripts checkout (no library/ folder). Pass --sd_scripts "
            "/path/to/sd-scripts, set SD_SCRIPTS_DIR, or run from your sd-scripts folder.")
    if not script_path.suffix:
        script_path = script_path.with_suffix(".py")
    if not script_path.is_absolute() and not script_path.is_file():
        script_path = root / script_path.name
    if not script_path.is_file():
        raise LauncherError(f"script {script} not found in {root}: name a trainer script such as train_network.py "
                            "or sdxl_train_network.py.")
    if script_path.resolve().parent != root:
        raise LauncherError(f"{script_path} is not in the sd-scripts folder {root}; pass the script from that checkout "
                            "(or --sd_scripts pointing to the folder that holds it).")
    return root, script_path.resolve()


def import_script(root: Path, script_path: Path):
    """Import the kohya script as a module with ``root`` first on ``sys.path``."""
    root_s = str(root)
    if root_s in sys.path:
        sys.path.remove(root_s)
    sys.path.insert(0, root_s)
    try:
        import library  # noqa: F401  - sd-scripts' package
    except ImportError as exc:
        raise LauncherError(f"cannot import sd-scripts' library package from {root} ({exc}); install sd-scripts' "
                            "requirements in this Python environment.") from exc
    lib_file = Path(getattr(sys.modules["library"], "__file__", "") or next(iter(sys.modules["library"].__path__), ""))
    if root not in lib_file.resolve().parents:
        raise LauncherError(f"the 'library' package imported from {lib_file} belongs to another sd-scripts checkout "
                            f"than {root}; run from that checkout or fix sys.path / SD_SCRIPTS_DIR.")
    try:
        return importlib.import_module(script_path.stem)
    except ImportError as exc:
        raise LauncherError(f"importing {script_path.name} failed ({exc}); install sd-scripts' requirements "
                            "(pip install -r requirements.txt in the checkout) in this Python environment.") from exc


def _main_block(module, script_path: Path) -> Optional[ast.Module]:
    tree = ast.parse(script_path.read_text(encoding="utf-8"), filename=str(script_path))
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
                and node.test.left.id == "__name__" and len(node.test.comparators) == 1
                and isinstance(node.test.comparators[0], ast.Constant)
                and node.test.comparators[0].value == "__main__"):
            return ast.Module(body=node.body, type_ignores=[])
    return None


def run_script(module, script_path: Path, trainer_cls: type, argv: List[str]) -> None:
    """Run the script's own ``__main__`` block with setup_parser and the trainer class replaced."""
    private_cls = private_trainer_class(trainer_cls)
    original_setup_parser = module.setup_parser

    def setup_parser():
        return add_privacy_arguments(original_setup_parser())

    block = _main_block(module, script_path)
    names = {n.id for n in ast.walk(block) if isinstance(n, ast.Name)} if block is not None else set()
    old_argv = sys.argv
    sys.argv = [str(script_path)] + list(argv)
    try:
        if block is not None and "setup_parser" in names and trainer_cls.__name__ in names:
            namespace = dict(vars(module))
            namespace.update({"setup_parser": setup_parser, trainer_cls.__name__: private_cls})
            exec(compile(block, str(script_path), "exec"), namespace)  # noqa: S102 - the user's own sd-scripts code
        else:  # the common five-line main of sd-scripts' trainers
            verify = reach.library_attr("train_util", "verify_command_line_training_args")
            read_config = reach.library_attr("train_util", "read_config_from_file")
            parser = setup_parser()
            args = parser.parse_args(argv)
            verify(args)
            args = read_config(args, parser)
            private_cls().train(args)
    finally:
        sys.argv = old_argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``smplora-kohya`` and ``python -m smplora_plugin.integrations.kohya``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        sd_dir, script, rest = split_argv(argv)
        if script is None:
            if "--version" in rest:
                print(f"smplora-kohya (smplora-plugin {__version__})")
                return 0
            print(USAGE, file=sys.stdout if ("-h" in rest or "--help" in rest) else sys.stderr)
            return 0 if ("-h" in rest or "--help" in rest) else 2
        root, script_path = find_sd_scripts(sd_dir, script)
        static_check(root / "train_network.py")
        module = import_script(root, script_path)
        import train_network  # shared by every *_train_network.py (now importable from root)

        trainer_cls = find_trainer_class(module, reach.network_trainer(train_network))
        check_trainer_class(trainer_cls, where=str(script_path))
        asks_help = any(a in ("-h", "--help") for a in rest)
        if (not asks_help and not any(a == "--privacy" or a.startswith("--privacy=") for a in rest)
                and "--config_file" not in " ".join(rest)):
            print("smplora-kohya: no --privacy option given, so this run trains without the SMP-LoRA defense "
                  "(add --privacy smplora --privacy_holdout_dir DIR to turn it on).", file=sys.stderr)
        run_script(module, script_path, trainer_cls, rest)
        return 0
    except KohyaVersionError as exc:
        print(f"smplora-kohya: error: {exc}", file=sys.stderr)
        return 3
    except SmploraError as exc:
        print(f"smplora-kohya: error: {exc}", file=sys.stderr)
        return 2
