"""``smplora-ai-toolkit``: put the SMP-LoRA extension into an ai-toolkit checkout, or take it out.

    smplora-ai-toolkit install /path/to/ai-toolkit     # writes extensions/smplora.py (a few lines that import us)
    smplora-ai-toolkit uninstall /path/to/ai-toolkit   # removes that file (only if this command wrote it)
    smplora-ai-toolkit check /path/to/ai-toolkit       # the layout check alone (the pieces the shim uses)

The written module imports ``smplora_plugin.integrations.ai_toolkit.extension``, so smplora-plugin must be
installed in the Python that runs ai-toolkit (``pip install smplora-plugin`` in its venv). When it is not, the
module still loads (ai-toolkit imports every extension for every job) and only a ``sd_trainer_smplora`` process
stops, saying what to install. Nothing else in the checkout is touched; a file this command did not write is
never overwritten or removed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from smplora_plugin import __version__
from smplora_plugin._io import atomic_write_text
from smplora_plugin.errors import SmploraError

from .process import PROCESS_TYPE
from .source import AiToolkitVersionError, check_source

MODULE_NAME = "smplora.py"
MARKER = "# smplora-ai-toolkit: managed file"
EXIT_VERSION = 3


class InstallError(SmploraError):
    """The path is not an ai-toolkit checkout, or the extension file is not this command's to change."""


MODULE_TEXT = f'''"""SMP-LoRA for ai-toolkit (smplora-plugin): the process type {PROCESS_TYPE} (docs/ai-toolkit.md).

Written by `smplora-ai-toolkit install`; remove it with `smplora-ai-toolkit uninstall <this checkout>`.
"""
{MARKER} (smplora-plugin {{version}})
try:
    from smplora_plugin.integrations.ai_toolkit.extension import AI_TOOLKIT_EXTENSIONS
except ModuleNotFoundError as _missing:
    if not (_missing.name or "").startswith("smplora_plugin"):
        raise
    from toolkit.extension import Extension as _Extension

    _REASON = str(_missing)

    class _NotInstalled:
        def __init__(self, *args, **kwargs):
            raise ImportError(
                "type: {PROCESS_TYPE} needs smplora-plugin in the Python that runs ai-toolkit (" + _REASON
                + "): pip install smplora-plugin there, or remove extensions/{MODULE_NAME}.")

    class _SmploraMissing(_Extension):
        uid = "{PROCESS_TYPE}"
        name = "SD Trainer with SMP-LoRA (smplora-plugin not installed)"

        @classmethod
        def get_process(cls):
            return _NotInstalled

    AI_TOOLKIT_EXTENSIONS = [_SmploraMissing]
'''


def module_text() -> str:
    """The content of ``extensions/smplora.py`` for this smplora-plugin version."""
    return MODULE_TEXT.replace("{version}", __version__)


def checkout_problems(root: Path) -> List[str]:
    """Why ``root`` is not an ai-toolkit checkout ([] when it is one)."""
    if not root.is_dir():
        return [f"{root} is not a folder"]
    needed = ["run.py", "toolkit/extension.py", "extensions_built_in/sd_trainer/SDTrainer.py"]
    missing = [n for n in needed if not (root / n).is_file()]
    return [f"{root} has no {', '.join(missing)}"] if missing else []


def _target(root: Path) -> Path:
    problems = checkout_problems(root)
    if problems:
        raise InstallError(f"{'; '.join(problems)}: not an ai-toolkit checkout (ostris/ai-toolkit, with run.py, "
                           "toolkit/extension.py and extensions_built_in/). Pass the folder you run `python run.py` "
                           "in.")
    if (root / "extensions" / "smplora").exists():
        raise InstallError(f"{root / 'extensions' / 'smplora'} exists and is not this command's; it would shadow "
                           f"extensions/{MODULE_NAME}. Move it away first.")
    return root / "extensions" / MODULE_NAME


def _ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def install(root: Path) -> str:
    """Write ``extensions/smplora.py`` into the checkout ``root`` (after its layout check); idempotent."""
    root = Path(root).expanduser()
    target = _target(root)
    check_source(root)
    if target.exists() and not _ours(target):
        raise InstallError(f"{target} exists and was not written by smplora-ai-toolkit; it was left as it is. Move "
                           "it away to install the SMP-LoRA extension.")
    text = module_text()
    if target.is_file() and target.read_text(encoding="utf-8") == text:
        return f"already installed: {target}"
    existed = target.exists()
    atomic_write_text(target, text)
    return f"{'updated' if existed else 'installed'}: {target} (process type: {PROCESS_TYPE})"


def uninstall(root: Path) -> str:
    """Remove ``extensions/smplora.py`` (and its compiled copies) when this command wrote it."""
    root = Path(root).expanduser()
    target = _target(root)
    if not target.exists():
        return f"not installed: {target} does not exist"
    if not _ours(target):
        raise InstallError(f"{target} was not written by smplora-ai-toolkit; it was left as it is.")
    target.unlink()
    for cached in (target.parent / "__pycache__").glob("smplora.*.pyc"):
        cached.unlink(missing_ok=True)
    return f"removed: {target}"


def check(root: Path) -> str:
    """The layout check of the checkout ``root`` alone."""
    root = Path(root).expanduser()
    _target(root)
    check_source(root)
    return f"{root}: every piece the SMP-LoRA process uses is there (tested: ai-toolkit 27a03a91)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``smplora-ai-toolkit`` command."""
    parser = argparse.ArgumentParser(prog="smplora-ai-toolkit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install", "uninstall", "check"])
    parser.add_argument("checkout", type=Path, help="the ai-toolkit checkout (the folder with run.py)")
    args = parser.parse_args(argv)
    action = {"install": install, "uninstall": uninstall, "check": check}[args.action]
    try:
        print(action(args.checkout))
    except AiToolkitVersionError as exc:
        print(f"smplora-ai-toolkit: {exc}", file=sys.stderr)
        return EXIT_VERSION
    except SmploraError as exc:
        print(f"smplora-ai-toolkit: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
