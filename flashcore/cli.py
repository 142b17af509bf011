"""The ``flashcore`` command: info | bench | tune | gate | profile.

Each subcommand lives with its subsystem and is imported only when used, so ``flashcore info``
starts fast and works without a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and main(args) -> int, help)
_SUBCOMMANDS = {
    "info": (
        "flashcore.info",
        "versions, GPU, available backends; --shape: the config dispatch picks",
    ),
    "bench": ("flashcore.bench.cli", "time FlashCore against SDPA and FlexAttention"),
    "tune": ("flashcore.tuning.cli", "EvoTuner: search kernel configs, write the tuning cache"),
    "gate": ("flashcore.tools.gate", "PTXAS resource gate over every dispatchable config (no GPU)"),
    "profile": ("flashcore.tools.profile", "Nsight Compute report of one FlashCore kernel launch"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flashcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(_SUBCOMMANDS) + "}")
    chosen = next((a for a in argv if a in _SUBCOMMANDS), None)
    for name, (module, help_) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(_SUBCOMMANDS[args.command][0]).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
