"""One run's export under several routing rules, evaluated by lm-evaluation-harness on the same tasks.

    python tools/lm_eval_rules.py RUN_DIR [--tasks dsmoe_heldout_ppl,dsmoe_next_line] [--out benchmarks/lm_eval_tiny]

Exports RUN_DIR's checkpoint once per rule (dense, MLP top-K for K = 1 and 2, the threshold rule
train.eval_threshold) into a scratch directory, runs lm_eval's own evaluator (`lm_eval.simple_evaluate`, the
`hf` model with trust_remote_code, as the CLI does) on each, and writes a table: the task metrics next to the
share of MLP experts each rule keeps on the held-out sample. The default tasks are the offline ones in
dsmoe/eval_tasks; any lm-eval task name works where its dataset can be read (HellaSwag, PIQA, ARC, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from _cli import git_commit

from dsmoe.commands.args import add_trust_pickle_argument
from dsmoe.eval_tasks import TASKS_DIR
from dsmoe.evaluation import evaluate, held_out_set
from dsmoe.export import export, load_export, run_config
from dsmoe.model import Routing, RoutingRule


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument("--tasks", default="dsmoe_heldout_ppl,dsmoe_next_line")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--limit", type=int, default=None, help="documents per task (lm-eval's --limit; tests only)"
    )
    parser.add_argument("--out", default="benchmarks/lm_eval_tiny")
    add_trust_pickle_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg, step = run_config(args.run_dir, trust_pickle=args.trust_pickle)
    rules = [
        Routing(),
        Routing(mlp=RoutingRule("top_k", k=1)),
        Routing(mlp=RoutingRule("top_k", k=2)),
        Routing(mlp=RoutingRule("threshold", eps=cfg.train.eval_threshold)),
    ]
    tasks = args.tasks.split(",")
    rows, results = [], {}
    scratch = Path(tempfile.mkdtemp(prefix="dsmoe-lm-eval-"))
    for i, rule in enumerate(rules):
        out = export(args.run_dir, scratch / f"rule{i}", rule, trust_pickle=args.trust_pickle)
        model, loaded_cfg, _, tokenizer_path = load_export(out)
        active = evaluate(model, held_out_set(loaded_cfg, tokenizer_path), rule).expert_active_fraction
        found = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={out},trust_remote_code=True",
            tasks=tasks,
            batch_size=args.batch_size,
            device="cpu" if not _cuda() else "cuda",
            limit=args.limit,
            task_manager=TaskManager(include_path=str(TASKS_DIR)),
        )["results"]
        results[str(rule)] = {"mlp_experts_active": active, **found}
        metrics = {
            f"{task} {name.split(',')[0]}": value
            for task, values in found.items()
            for name, value in values.items()
            if isinstance(value, float) and "stderr" not in name
        }
        rows.append((str(rule), active, metrics))
        print(str(rule), f"{active:.1%}", json.dumps(metrics), flush=True)
    columns = list(rows[0][2])
    lines = [
        f"# lm-evaluation-harness on one export under each routing rule ({Path(args.run_dir).name}, step {step})",
        "",
        f"- machine: {_machine()}; date: {datetime.date.today()}; commit: {git_commit()}",
        f"- command: `python tools/lm_eval_rules.py {shlex.join(sys.argv[1:])}`",
        f"- tasks: {args.tasks} (dsmoe/eval_tasks: offline, from the held-out works); lm-eval "
        f"{lm_eval.__version__}, model `hf` with trust_remote_code",
        "",
        "| rule | MLP experts active | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for rule, active, metrics in rows:
        lines.append(f"| {rule} | {active:.1%} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(
        json.dumps({"command": sys.argv, "results": results}, indent=1, default=str)
    )
    print("\n".join(lines))
    return 0


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "CPU"
    )
    return f"{os.cpu_count()} x {cpu}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
