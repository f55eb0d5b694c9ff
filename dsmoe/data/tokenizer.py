"""Any local Hugging Face tokenizer, reduced to what dsmoe needs: ids, the end-of-document token, a fingerprint.

`data.tokenizer` names a directory that `AutoTokenizer.from_pretrained(dir, local_files_only=True)` loads
(Llama-3, Qwen, GPT-NeoX, ...: any fast tokenizer) or a `tokenizer.json`. Both come down to the `tokenizers`
library's Tokenizer, which is what runs, what a run saves (`tokenizer.json`) and what its fingerprint hashes,
so a dataset, a checkpoint and an export can tell whether they were made with the same tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dsmoe.data.corpus import DataError

# End-of-document tokens of the common families, tried in order when a bare tokenizer.json does not say
# which one it uses: ours and GPT-2 / GPT-NeoX / Qwen, Llama-3, Llama-2 / Mistral, Gemma.
KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
UINT16_VOCAB = 2**16  # token ids up to 65,535 fit uint16; a larger vocabulary is stored as int32


def token_dtype(vocab_size: int) -> type[np.integer]:
    """The narrowest storage for ids of a vocabulary (megatron-core's rule: int32 above 65,536 entries)."""
    return np.uint16 if vocab_size <= UINT16_VOCAB else np.int32


@dataclass
class LocalTokenizer:
    """A loaded tokenizer: the `tokenizers` backend and its end-of-document token."""

    backend: Tokenizer
    eos_token: str
    source: str
    """Where it was loaded from (for messages)."""

    @functools.cached_property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can produce, added tokens included (a vocabulary may
        leave gaps in its ids: the count of its entries could be smaller)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def eos_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def token_dtype(self) -> type[np.integer]:
        return token_dtype(self.vocab_size)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.backend)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, without the special tokens a chat or BOS template would add."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Documents concatenated, each followed by the end-of-document token, in the vocabulary's dtype."""
        ids: list[int] = []
        for doc in self.encode_batch(texts):
            ids.extend(doc)
            ids.append(self.eos_id)
        return np.asarray(ids, dtype=self.token_dtype)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    def save(self, path: Path) -> None:
        """Write the tokenizer.json that runs and exports carry."""
        path.write_text(self.backend.to_str())


IDS_DECIDED_BY = ("added_tokens", "normalizer", "pre_tokenizer", "model")


def fingerprint(backend: Tokenizer) -> str:
    """SHA-256 of what decides the ids of a text encoded without special tokens (added tokens, normalizer,
    pre-tokenizer, model), not of what does not (padding, truncation, the BOS/EOS template transformers
    adds as a post-processor, the decoder) or of the file's formatting."""
    spec = json.loads(backend.to_str())
    return hashlib.sha256(
        json.dumps([spec.get(k) for k in IDS_DECIDED_BY], sort_keys=True).encode()
    ).hexdigest()


def load_tokenizer(spec: str | Path, eos_token: str = "") -> LocalTokenizer:
    """A tokenizer directory (AutoTokenizer, local files only) or a tokenizer.json; `eos_token` overrides the
    end-of-document token the tokenizer declares."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"tokenizer {path} does not exist (a tokenizer directory or a tokenizer.json)")
    declared = ""
    if path.is_dir():
        backend, declared = _from_directory(path)
    else:
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"tokenizer {path} is not a tokenizers JSON file: {str(e)[:300]}") from None
    backend.no_padding()
    backend.no_truncation()
    eos = eos_token or declared or next((t for t in KNOWN_EOS if backend.token_to_id(t) is not None), "")
    if not eos or backend.token_to_id(eos) is None:
        raise DataError(
            f"tokenizer {path}: "
            + (
                f"its end-of-document token {eos!r} is not in its vocabulary"
                if eos
                else "no end-of-document token"
            )
            + f" (tried {', '.join(KNOWN_EOS)}); name one with data.eos_token (or --eos-token)"
        )
    return LocalTokenizer(backend, eos, str(path))


def _from_directory(path: Path) -> tuple[Tokenizer, str]:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise DataError(
            f"tokenizer directory {path} does not load with AutoTokenizer: {str(e)[:300]}"
        ) from None
    if not getattr(hf, "is_fast", False):
        raise DataError(
            f"tokenizer directory {path} holds a slow (Python) tokenizer; dsmoe needs a fast one "
            "(a tokenizer.json): convert it with AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained()"
        )
    return hf.backend_tokenizer, hf.eos_token or ""
