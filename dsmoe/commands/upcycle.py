"""Upcycle a dense model into a DS-MoE model with the same function, ready to train on.

    dsmoe upcycle SOURCE OUT_DIR --experts 8 [--attention-experts 4]

SOURCE: a dense dsmoe export or run directory (model.mlp: dense), or a transformers Llama-style checkpoint
directory (config.json + *.safetensors; Llama, Mistral, Qwen3). OUT_DIR becomes an exported dsmoe model
(dense routing) plus `train.yaml`, the config to continue training from it:

    deepspeed launchers/train.py --config OUT_DIR/train.yaml

The command checks that the upcycled model's logits equal the dense model's on a random batch and prints
the largest difference. A transformers source without tokenizer.json needs --tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dsmoe.commands.args import parser_for


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from omegaconf import OmegaConf

    from dsmoe import config as config_lib
    from dsmoe.export import write_export
    from dsmoe.model import Routing
    from dsmoe.train.checkpoint import CheckpointError
    from dsmoe.upcycle import UpcycleError, build_upcycled, dense_model, load_dense

    parser = parser_for(__doc__, prog)
    parser.add_argument("source")
    parser.add_argument("out_dir")
    parser.add_argument("--experts", type=int, required=True, help="MLP experts per layer")
    parser.add_argument("--attention-experts", type=int, default=0, help="MoA experts per layer (0: plain)")
    parser.add_argument("--tokenizer", help="tokenizer.json, when the source has none")
    args = parser.parse_args(argv)
    try:
        sd, cfg, tokenizer = load_dense(args.source)
        tokenizer = Path(args.tokenizer) if args.tokenizer else tokenizer
        if tokenizer is None or not tokenizer.is_file():
            raise UpcycleError(f"{args.source} has no tokenizer.json: name one with --tokenizer")
        dense = dense_model(sd, cfg.model)
        moe, moe_cfg = build_upcycled(sd, cfg.model, args.experts, args.attention_experts)
    except (UpcycleError, CheckpointError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    idx = torch.randint(0, moe_cfg.vocab_size, (2, min(64, moe_cfg.max_seq_len)))
    with torch.no_grad():
        difference = (moe(idx).logits - dense(idx).logits).abs().max().item()
    cfg.model = moe_cfg
    cfg.train.eval_top_k = min(cfg.train.eval_top_k, args.experts)
    cfg.train.init_from = str(Path(args.out_dir).resolve())
    out = write_export(moe, cfg, tokenizer, args.out_dir, Routing(), step=0)
    (out / "train.yaml").write_text(OmegaConf.to_yaml(config_lib.to_dict(cfg)))
    n_expert = moe.num_expert_params()
    print(
        f"upcycled {args.source}: {moe_cfg.n_layers} layers, {args.experts} MLP experts x {moe_cfg.moe.expert_hidden}"
        + (
            f", MoA {args.attention_experts} x {moe_cfg.attention.heads_per_expert} heads"
            if args.attention_experts
            else ""
        )
        + f"; {moe.num_params() / 1e6:.2f}M parameters ({n_expert / 1e6:.2f}M in MLP experts)\n"
        f"largest logit difference to the dense model: {difference:.2e}\n"
        f"wrote {out} (continue training: deepspeed launchers/train.py --config {out / 'train.yaml'})"
    )
    return 0
