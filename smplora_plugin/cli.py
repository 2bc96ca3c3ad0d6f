"""The ``smplora`` command: ``smplora audit ...``, ``smplora references prepare ...`` and ``smplora demo ...``.

Sub-command modules are imported only when their command runs, so ``smplora --help`` is fast and
a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from .errors import SmploraError


def _demo_module():
    try:
        from .demo import cli as demo_cli
    except ImportError as exc:
        return None, exc
    if not (hasattr(demo_cli, "add_arguments") and hasattr(demo_cli, "run")):
        return None, AttributeError("smplora_plugin.demo.cli lacks add_arguments(parser) / run(args)")
    return demo_cli, None


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; only the sub-command named by ``command`` gets its full arguments."""
    parser = argparse.ArgumentParser(prog="smplora",
                                     description="SMP-LoRA membership-inference defense: audit and demo.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{audit,references,demo}")
    audit = sub.add_parser("audit", help="audit a LoRA file for membership-inference leakage",
                           description="Run the membership-inference attack suite on a LoRA file against a "
                                       "diffusers base model and member / non-member images; writes report.md "
                                       "(the verdict first), report.json, roc.png, per_timestep_auc.png and "
                                       "manifest.json to --out (with --run: the pooled report.md, report.json and "
                                       "roc.png there, and each run's files in --out/run_NN_<name>/).")
    if command == "audit":
        from .audit.cli import add_arguments

        audit.add_argument("--list-attacks", action="store_true", help="list the available attacks and exit")
        add_arguments(audit)
    if command == "references":
        from .audit.references_cli import build_parser as references_parser

        references_parser(sub)
    else:
        sub.add_parser("references", help="reference LoRAs for LiRA / RMIA: prepare their training sets")
    demo = sub.add_parser("demo", help="the end-to-end demo: plain LoRA vs SMP-LoRA on digits, audited",
                          description="On a tiny latent diffusion model (digits), fine-tune LoRA with and "
                                      "without SMP-LoRA, audit each and the untouched base model, and print the "
                                      "side-by-side table: verdict first, then utility.")
    if command == "demo":
        mod, _ = _demo_module()
        if mod is not None:
            mod.add_arguments(demo)
        else:
            demo.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_in: List[str] = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_in if not a.startswith("-")), None)
    if command == "audit" and "--list-attacks" in args_in:
        from .audit.cli import list_attacks

        print(list_attacks())
        return 0
    parser = build_parser(command)
    args = parser.parse_args(args_in)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "audit":
            from .audit.cli import run

            return int(run(args) or 0)
        if args.command == "references":
            from .audit.references_cli import run as references_run

            return int(references_run(args) or 0)
        mod, exc = _demo_module()
        if mod is None:
            print(f"smplora: error: `smplora demo` is not available: smplora_plugin.demo.cli could not be loaded "
                  f"({exc}). Install the demo extra: pip install 'smplora-plugin[demo]'.", file=sys.stderr)
            return 2
        return int(mod.run(args) or 0)
    except SmploraError as exc:
        print(f"smplora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"smplora {args.command}: error: a dependency is missing ({exc}). "
              "Install the extra: pip install 'smplora-plugin[audit]'.", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
