"""End-of-run report: export the sparse model, evaluate held-out perplexity per routing rule, plot the curves.

A training feature (dsmoe/train/feature.py) that dsmoe.run adds to every run: the export and its evaluation sit
above training in the layers (model <- parallel <- train <- export/infer <- run and commands)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dsmoe.config import Config
from dsmoe.evaluation import HeldOut, evaluate, held_out_set, mlm_loss
from dsmoe.export import export
from dsmoe.infer import load
from dsmoe.model import Routing, RoutingRule
from dsmoe.train.feature import Feature
from dsmoe.train.logging import read_metrics


def evaluation_rules(cfg: Config) -> list[Routing]:
    """Dense, then the configured top-K and threshold rules on the MLP with every attention expert kept (as
    the paper does), then the threshold rule on MoA attention as well, to show what sparse attention costs."""
    t, rules = cfg.train, [Routing()]
    threshold = RoutingRule("threshold", eps=t.eval_threshold)
    if cfg.model.mlp == "moe":
        rules += [Routing(mlp=RoutingRule("top_k", k=t.eval_top_k)), Routing(mlp=threshold)]
    if cfg.model.attention.experts:
        rules.append(Routing(mlp=rules[-1].mlp, attention=threshold))
    return rules


def held_out_name(cfg: Config, held_out: HeldOut) -> str:
    """What the held-out sample is, for the report's heading."""
    if cfg.data.corpus == "indexed":
        split = "data.valid_blend" if cfg.data.valid_blend else f"validation split {cfg.data.split}"
        return f"{split} of {', '.join(held_out.source_names)}"
    return ", ".join(cfg.data.val_works) if cfg.data.corpus == "shakespeare" else cfg.data.val_tokens


def final_report(run_dir: Path, cfg: Config, logger=None, held_out: HeldOut | None = None) -> dict:
    """Export with the paper's default rule, then the held-out perplexity of each rule on the run's fixed
    validation sample, with the evaluator that ran during training (dsmoe.evaluation)."""
    rules = evaluation_rules(cfg)
    # The export carries the paper's default: the threshold rule on the MLP, every attention expert kept.
    default = next((r for r in rules if r.mlp.mode == "threshold" and r.attention.mode == "dense"), rules[0])
    export_dir = export(run_dir, run_dir / "export", default)
    loaded = load(export_dir)
    held_out = held_out or held_out_set(loaded.cfg, loaded.tokenizer_path)
    results = [evaluate(loaded.model, held_out, rule) for rule in rules]
    rows = [r.row() for r in results]
    if len(held_out.source_names) > 1:
        rows += [
            f"{r.routing:<52} per source: "
            + ", ".join(f"{name} {math.exp(loss):.2f}" for name, loss in r.source_loss.items())
            for r in results
        ]
    summary = _write_summary(
        run_dir,
        export_dir,
        {"eval_tokens": results[0].tokens, "results": [r.__dict__ for r in results]},
        f"held-out perplexity ({held_out_name(cfg, held_out)}; {results[0].tokens} tokens), exported to {export_dir}:",
        rows,
    )
    if logger is not None:
        logger.log_summary({f"eval/ppl/{r.routing}": r.perplexity for r in results})
    return summary


def encoder_report(run_dir: Path, cfg: Config, logger=None, held_out: HeldOut | None = None) -> dict:
    """The encoder's end of run: export, then held-out MLM loss at 15% masking (mlm.eval_probability) at the
    training length and at mlm.eval_seq_lens (ALiBi extrapolation), dense and, for DS-MoE, under the
    configured top-K and threshold rules."""
    from tokenizers import Tokenizer

    from dsmoe.data.mlm import MASK_TOKEN, eval_batches

    rules = evaluation_rules(cfg)
    default = next((r for r in rules if r.mlp.mode == "threshold"), rules[0])
    export_dir = export(run_dir, run_dir / "export", default)
    loaded = load(export_dir)
    held_out = held_out or held_out_set(loaded.cfg, loaded.tokenizer_path)
    tokens = held_out.token_stream()
    # The export's tokenizer carries the mask and padding tokens after the run's own ids: the mask's id is the
    # size of the vocabulary training masked with (its get_vocab_size() counts both, which masked with an
    # untrained id before 2026-12-02).
    tokenizer_vocab = Tokenizer.from_file(str(loaded.tokenizer_path)).token_to_id(MASK_TOKEN)
    results = []
    for seq_len in [cfg.data.seq_len, *cfg.mlm.eval_seq_lens]:
        batches = eval_batches(
            tokens,
            seq_len,
            cfg.mlm.eval_probability,
            tokenizer_vocab,
            cfg.train.eval_tokens,
            seed=cfg.train.seed,
        )
        results += [mlm_loss(loaded.model, batches, rule, seq_len) for rule in rules]
    summary = _write_summary(
        run_dir,
        export_dir,
        {
            "eval_masking": cfg.mlm.eval_probability,
            "results": [dict(r.__dict__, perplexity=r.perplexity) for r in results],
        },
        f"held-out MLM ({held_out_name(cfg, held_out)}; {cfg.mlm.eval_probability:.0%} masked), "
        f"exported to {export_dir}:",
        [r.row() for r in results],
    )
    if logger is not None:
        logger.log_summary({f"eval/mlm_loss/{r.routing}/seq{r.seq_len}": r.loss for r in results})
    return summary


def _write_summary(run_dir: Path, export_dir: Path, figures: dict, heading: str, rows: list[str]) -> dict:
    """The end-of-run summary both backbones share: summary.json (steps, last training loss, the
    evaluation `figures`), the loss-curve plot, and the printed table."""
    metrics = read_metrics(run_dir)
    summary = {
        "run_dir": str(run_dir),
        "export_dir": str(export_dir),
        "steps": metrics[-1]["step"] if metrics else 0,
        "final_train_loss": metrics[-1]["loss"] if metrics else None,
        **figures,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_path = plot_curves(metrics, run_dir / "loss_curve.png")
    print("\n".join(["", heading, *("  " + row for row in rows), f"loss curve: {plot_path}"]), flush=True)
    return summary


def plot_curves(metrics: list[dict], path: Path) -> Path:
    """Training loss and router entropy per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, [m["lm_loss"] for m in metrics])
    axes[0].set(xlabel="step", ylabel="LM loss (nats)", title="training loss")
    for key, style, kind in (("router_entropy", "-", "MLP"), ("attention_router_entropy", "--", "attention")):
        if metrics and key in metrics[0]:
            for layer in range(len(metrics[0][key])):
                series = [m[key][layer] for m in metrics]
                axes[1].plot(steps, series, style, color=f"C{layer}", label=f"{kind} layer {layer}")
    if metrics and "router_entropy" in metrics[0]:
        axes[1].set(xlabel="step", ylabel="nats", title="mean per-token routing entropy")
        axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class EndOfRunReport(Feature):
    """train.export_at_end: once a run has finished and saved its last step, export it and report."""

    def finish(self, trainer) -> None:
        cfg, result = trainer.cfg, trainer.result
        if (
            trainer.dims.is_main
            and cfg.train.export_at_end
            and trainer.finished
            and trainer.last_saved == result.steps
        ):
            report = encoder_report if cfg.model.is_encoder else final_report
            result.summary = report(trainer.run_dir, cfg, trainer.logger, trainer.held_out)
