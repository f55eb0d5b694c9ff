"""Export a training run's checkpoint as a sparse-inference model directory.

    dsmoe convert RUN_DIR OUT_DIR [--top-k K | --threshold EPS] [--tag step_00000300]
    dsmoe convert RUN_DIR OUT_DIR --format qwen3_moe --top-k K

Consolidates any ZeRO stage and rank count into fp32 safetensors, with config.json (routing rule
included), tokenizer.json and the model's code (transformers remote code: AutoModelForCausalLM loads it with
trust_remote_code=True where dsmoe is not installed). Without a rule: the threshold rule
(train.eval_threshold) on the MLP and every attention expert kept, as the paper serves its models.
--attention-* flags set the MoA rule.
"""

from __future__ import annotations

import sys

from dsmoe.commands.args import (
    add_routing_arguments,
    add_trust_pickle_argument,
    parser_for,
    routing_from_args,
)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from dsmoe.export import export, export_qwen3_moe, run_config
    from dsmoe.model import Routing, RoutingRule
    from dsmoe.train.checkpoint import CheckpointError

    parser = parser_for(__doc__, prog)
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    parser.add_argument(
        "--format",
        choices=["dsmoe", "qwen3_moe"],
        default="dsmoe",
        help="dsmoe (any model; its code travels with it) or qwen3_moe (stock transformers, top-K MLP "
        "routing; needs SwiGLU experts, plain GQA attention and QK-norm)",
    )
    add_routing_arguments(parser)
    add_trust_pickle_argument(parser)
    args = parser.parse_args(argv)
    try:
        cfg, step = run_config(args.run_dir, args.tag, args.trust_pickle)
        if args.format == "qwen3_moe":
            if args.top_k is None:
                parser.error("--format qwen3_moe routes the MLP by top-K: give --top-k K")
            out = export_qwen3_moe(args.run_dir, args.out_dir, args.top_k, args.tag, args.trust_pickle)
            print(
                f"exported step {step} of {args.run_dir} to {out} as qwen3_moe (top-{args.top_k}, no renormalisation)"
            )
            return 0
        rule = routing_from_args(args, Routing(mlp=RoutingRule("threshold", eps=cfg.train.eval_threshold)))
        for kind, layer_rule, experts in (
            ("MLP", rule.mlp, cfg.model.moe.num_experts),
            ("attention", rule.attention, cfg.model.attention.experts),
        ):
            if layer_rule.mode != "dense" and layer_rule.k > experts:
                parser.error(f"{kind} top-K {layer_rule.k} exceeds the model's {experts} {kind} experts")
        out = export(args.run_dir, args.out_dir, rule, args.tag, args.trust_pickle)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.run_dir} to {out} (routing: {rule})")
    return 0
