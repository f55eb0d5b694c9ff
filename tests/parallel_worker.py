"""One rank of a small training run under a dp x ep x tp layout, for tests/test_parallel.py.

Each rank trains the same tiny MoA + DS-MoE model through our DeepSpeed engine for three optimizer steps
on fixed global batches and saves what it holds (its shards of the gradients and weights, its slice of the
sparse-inference logits) for the test to reassemble and compare with the single-process run.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 8, 16, 64, 3


def config(dp: int, ep: int, tp: int, zero_stage: int, activation: str):
    from dsmoe import config as config_lib

    overrides = [
        "model.d_model=32",
        "model.n_layers=2",
        f"model.vocab_size={VOCAB}",
        f"model.max_seq_len={SEQ}",
        f"data.seq_len={SEQ}",
        "model.moe.num_experts=4",
        "model.moe.expert_hidden=8",
        f"model.moe.activation={activation}",
        "model.attention.experts=4",
        "model.attention.heads_per_expert=1",
        "model.attention.kv_heads=2",
        "model.attention.backend=eager",
        "model.moe.alpha=0.1",  # large enough that a wrong MI gradient would show
        "model.attention.alpha=0.1",
        f"parallel.dp={dp}",
        f"parallel.ep={ep}",
        f"parallel.tp={tp}",
        f"parallel.zero_stage={zero_stage}",
        f"train.global_batch_size={GLOBAL_BATCH}",
        f"train.micro_batch_size={GLOBAL_BATCH // (dp * ep)}",
        "train.precision=fp32",
        "train.lr=0.01",
        "train.warmup_steps=1",
        "train.max_steps=10",
        "train.grad_clip=0.5",  # binds: the clipped update checks the global gradient norm
    ]
    return config_lib.load(Path(__file__).parents[1] / "configs" / "tiny.yaml", overrides)


def batches():
    g = torch.Generator().manual_seed(1234)
    return [
        (
            torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g),
            torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g),
        )
        for _ in range(STEPS)
    ]


def run_rank(
    rank: int, world: int, port: int, layout: tuple, zero_stage: int, activation: str, dispatch: str, out: str
):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        os.environ["DS_ACCELERATOR"] = (
            "cpu"  # gloo processes (NCCL with one GPU per rank where there are enough)
        )
    torch.set_num_threads(1)
    import parallel
    from dsmoe.model import build
    from dsmoe.model.moe import Routing, RoutingRule
    from dsmoe.train import engine as engine_lib
    from parallel import groups
    from parallel.tensor import gather_logits

    cfg = config(*layout, zero_stage, activation)
    dims = groups.init(cfg.parallel)
    torch.manual_seed(0)
    model = build(cfg.model)
    parallel.apply(model, dims, dispatch)
    engine = engine_lib.initialize(model, cfg, dims)
    rows = slice(
        dims.batch_rank * cfg.train.micro_batch_size, (dims.batch_rank + 1) * cfg.train.micro_batch_size
    )
    result = {
        "where": (dims.tp_rank, dims.ep_rank, dims.batch_rank, dims.dp_rank),
        "loss": [],
        "mi": [],
        "norm": [],
    }
    for step, (x, y) in enumerate(batches()):
        o = engine(x[rows].to(dims.device), y[rows].to(dims.device))
        engine.backward(o.loss)
        if step == 0 and zero_stage == 0:  # DeepSpeed has reduced the gradients over the data groups now
            # a copy: on CPU .cpu() would alias the gradient that later steps overwrite
            result["grads"] = {n: p.grad.to("cpu", copy=True) for n, p in engine.module.named_parameters()}
        norm, _ = engine_lib.boundary_step(engine)
        stats = torch.stack([o.loss.detach(), o.mlp.mi_loss.detach(), o.attention.mi_loss.detach()])
        torch.distributed.all_reduce(stats)
        stats = stats.cpu()
        stats /= world
        result["loss"].append(float(stats[0]))
        result["mi"].append((float(stats[1]), float(stats[2])))
        result["norm"].append(norm)
    result["weights"] = {n: p.detach().to("cpu", copy=True) for n, p in engine.module.named_parameters()}
    # Held-out evaluation as train.eval_every runs it: 7 rows of two sources shared out over the batch ranks,
    # the last forward padded (7 is no multiple of any layout's rows per forward).
    from dsmoe.evaluation import HeldOut, evaluate
    from dsmoe.model import TRAINING

    g = torch.Generator().manual_seed(99)
    held_out = HeldOut(
        torch.randint(0, VOCAB, (7, SEQ + 1), generator=g), torch.tensor([0, 1, 1, 0, 1, 0, 0]), ["a", "b"]
    )
    result["eval"] = evaluate(engine.module, held_out, TRAINING, batch_size=2, dims=dims)
    engine.module.eval()
    with torch.no_grad():
        sparse = Routing(RoutingRule("top_k", k=2), RoutingRule("top_k", k=2))
        logits = engine.module(batches()[0][0][rows].to(dims.device), routing=sparse).logits
        result["sparse_logits"] = gather_logits(logits, dims).cpu()
        threshold = Routing(RoutingRule("threshold", eps=1.0))  # MLP: fixed slots (ep: gathered tokens)
        logits = engine.module(batches()[0][0][rows].to(dims.device), routing=threshold).logits
        result["threshold_logits"] = gather_logits(logits, dims).cpu()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    layout: tuple, zero_stage: int, activation: str, out: Path, dispatch: str = "tokens"
) -> list[dict]:
    """Run every rank of `layout` as a process (gloo, one thread each); their results by rank."""
    import torch.multiprocessing as mp

    world = layout[0] * layout[1] * layout[2]
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        run_rank,
        args=(world, free_port(), layout, zero_stage, activation, dispatch, str(out)),
        nprocs=world,
        start_method="spawn",
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
