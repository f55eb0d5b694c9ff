"""Sample text from an exported model or a run, with a KV cache and sparse routing.

    dsmoe generate MODEL_OR_RUN_DIR --prompt "ROMEO:" [--max-new-tokens 120] [--temperature 0.8]
        [--top-k 40] [--top-p 0.9] [--samples 2] [--seed 0] [--mlp-top-k K | --mlp-threshold EPS] ...

--top-k / --top-p are sampling options here; the MLP routing rule takes the --mlp- prefix
(--mlp-top-k, --mlp-threshold, --mlp-threshold-top-k, --mlp-dense) and MoA attention --attention-.
Without routing flags: the export's own rule (dense for a run directory). With every attention expert kept
(the paper's rule) it runs dsmoe.infer.Engine (static KV cache, CUDA-graph decode on a GPU); a sparse
attention rule takes dsmoe.infer.generate.
"""

from __future__ import annotations

import torch

from dsmoe.commands.args import (
    add_routing_arguments,
    add_trust_pickle_argument,
    load_model_or_exit,
    parser_for,
    routing_from_args,
)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from tokenizers import Tokenizer

    from dsmoe.data.tokens import EOS
    from dsmoe.infer import Engine, generate, generate_fast, in_growth_ramp

    parser = parser_for(__doc__, prog)
    parser.add_argument("path", help="exported model directory or training run directory")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_routing_arguments(parser, mlp_prefix="mlp-")
    add_trust_pickle_argument(parser)
    args = parser.parse_args(argv)
    loaded = load_model_or_exit(args.path, args.trust_pickle)
    routing = routing_from_args(args, loaded.routing, mlp_prefix="mlp_")
    tok = Tokenizer.from_file(str(loaded.tokenizer_path))
    prompt = torch.tensor(
        [tok.encode(args.prompt, add_special_tokens=False).ids] * args.samples, device=args.device
    )
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    model = loaded.model.to(args.device)
    eos = tok.token_to_id(loaded.cfg.data.eos_token or EOS)  # the end-of-document token the run trained on
    sampling = (args.temperature, args.top_k, args.top_p, eos, generator)
    if routing.attention.mode == "dense" and not in_growth_ramp(model):  # else the plain KV-cache loop
        max_len = min(prompt.shape[1] + args.max_new_tokens, model.cfg.max_seq_len)
        engine = Engine(model, routing, batch=args.samples, max_len=max_len)
        out = generate_fast(engine, prompt, args.max_new_tokens, *sampling)
    else:
        out = generate(model, prompt, args.max_new_tokens, routing, *sampling)
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i + 1} ({routing})\n{tok.decode(row)}")
    return 0
