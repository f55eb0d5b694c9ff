"""`dsmoe SUBCOMMAND ...`: the commands a user runs after (or before) training. Training itself is
`deepspeed launchers/train.py --config CONFIG [key=value ...]`."""

from __future__ import annotations

import importlib
import sys

# name -> (module under dsmoe.commands, one line for the overview)
COMMANDS = {
    "prepare-data": ("prepare_data", "tokenize raw text into megatron-core's indexed dataset (data.blend)"),
    "convert": ("convert", "export a run's checkpoint as a sparse model (safetensors + its code)"),
    "eval": ("eval", "held-out perplexity of an export or a run under a routing rule"),
    "generate": ("generate", "sample text from an export or a run (KV cache, sparse routing)"),
    "upcycle": ("upcycle", "turn a dense model (ours or Llama-style) into a DS-MoE with the same function"),
    "reshard": ("reshard", "cut a checkpoint for another tensor/expert-parallel layout"),
}


def usage() -> str:
    from dsmoe import __version__

    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    return (
        f"usage: dsmoe SUBCOMMAND [--help] ...   (dsmoe {__version__})\n\n"
        + "\n".join(lines)
        + "\n\ntraining: deepspeed launchers/train.py --config configs/NAME.yaml [key=value ...]"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from dsmoe import __version__

        print(f"dsmoe {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"dsmoe: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"dsmoe.commands.{COMMANDS[name][0]}")
    return module.main(argv[1:], prog=f"dsmoe {name}")


if __name__ == "__main__":
    sys.exit(main())
