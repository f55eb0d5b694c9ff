"""transformers integration: an exported dsmoe directory loads with the Auto classes.

    import dsmoe.hf  # registers model_type "dsmoe" with AutoConfig / AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/tiny")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file="out/tiny/tokenizer.json")
    model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=40)

The wrapped model is our DecoderLM, running the routing rule saved in the export (sparse MLP experts,
by default every attention expert). No weights are converted: the export's safetensors load as they are.
`generate()` prefills once and then feeds one token per step through our model's own KV cache path
(DecoderLM's `cache=`: one shared K/V per layer, whatever the MoA experts), wrapped in DSMoECache, a
transformers `Cache`; `use_cache=False` recomputes the whole prefix each step. Prompts of a batch must have
one length: a padded attention_mask (zeros) is refused, since our attention has no key-padding mask.

An encoder export (model_type "dsmoe_encoder") loads the same way with AutoModelForMaskedLM: our
EncoderMLM, unpadding the batch from its attention_mask, logits (B, S, V) with zeros at padding.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput

# Only the model package, which depends on torch alone: an export carries this file and the model's files as
# transformers remote code (dsmoe/remote_code.py rewrites these imports to relative ones).
from dsmoe.model.attention import KVCache
from dsmoe.model.config import model_config_from_dict
from dsmoe.model.encoder import EncoderMLM
from dsmoe.model.moe import Routing
from dsmoe.model.transformer import DecoderLM

CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""What transformers calls the cache in model outputs and generate()'s model inputs (renamed from
past_key_values in transformers 5.2x; the GPU image's 5.17 still uses the old name)."""


class DSMoEConfig(PretrainedConfig):
    """The `config.json` of an export: our full config under `dsmoe`, the routing rule under `routing`."""

    model_type = "dsmoe"

    def __init__(self, dsmoe: dict | None = None, routing: dict | None = None, **kwargs):
        super().__init__(**_config_kwargs(self, dsmoe, routing, kwargs))


def _config_kwargs(config: PretrainedConfig, dsmoe: dict | None, routing: dict | None, kwargs: dict) -> dict:
    """Set our config and routing on `config`; the standard transformers keys they imply."""
    config.dsmoe = dsmoe or {}
    config.routing = routing or Routing().to_dict()
    model = config.dsmoe.get("model", {})
    kwargs.setdefault("vocab_size", model.get("vocab_size"))
    kwargs.setdefault("hidden_size", model.get("d_model"))
    kwargs.setdefault("num_hidden_layers", model.get("n_layers"))
    kwargs.setdefault("tie_word_embeddings", model.get("tie_embeddings", True))
    return kwargs


def _checked(path) -> None:
    """Before transformers reads an export: its files are there and whole, else one line naming the file."""
    from pathlib import Path

    try:  # with dsmoe installed; the export's remote code runs without it (and without this check)
        from dsmoe.export import check_export
    except ImportError:
        return
    if Path(str(path)).is_dir():
        check_export(path)


class DSMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """DecoderLM behind the transformers interface (logits, loss with shifted labels, generate)."""

    config_class = DSMoEConfig
    base_model_prefix = "decoder"  # the export stores DecoderLM's own keys; transformers adds the prefix
    _tied_weights_keys = {"decoder.lm_head.weight": "decoder.embed.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: DSMoEConfig):
        super().__init__(config)
        model_cfg = model_config_from_dict(config.dsmoe["model"])
        self.routing = Routing.from_dict(config.routing)
        self.decoder = DecoderLM(model_cfg)
        self.post_init()

    def _init_weights(self, module):  # weights come from the checkpoint; DecoderLM initialises its own
        pass

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        _checked(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self):
        return self.decoder.embed

    def get_output_embeddings(self):
        return self.decoder.lm_head

    def new_cache(self, batch: int, max_len: int | None = None) -> DSMoECache:
        """An empty cache to pass to generate(cache=...) or forward; it grows as needed up to max_seq_len."""
        return DSMoECache(self.decoder.new_cache(batch, max_len), self.decoder.cfg.max_seq_len)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask=None,
        labels=None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of input_ids; with a cache (or use_cache=True) input_ids continue the tokens already in it.

        generate() hands the first step an empty transformers Cache: it is replaced by a DSMoECache, returned
        as `cache`, which generate then passes back with one new token per step.
        """
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)  # the pre-5.x name
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "dsmoe models need equal-length prompts: attention_mask has zeros (padding), and our attention "
                "has no padding mask, so padded rows would get wrong positions and attend to the pad tokens. "
                "Generate prompts of different lengths in separate calls (or group them by length)."
            )
        if use_cache is False:
            cache = None
        elif cache is not None and not isinstance(cache, DSMoECache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    f"DSMoEForCausalLM keeps keys/values in a DSMoECache (model.new_cache); got a non-empty "
                    f"{type(cache).__name__}"
                )
            cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        elif cache is None and use_cache:
            cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        if cache is not None:
            length = cache.get_seq_length() + input_ids.shape[1]
            if length > self.decoder.cfg.max_seq_len:
                raise ValueError(
                    f"sequence length {length} exceeds model.max_seq_len {self.decoder.cfg.max_seq_len} "
                    "(generate with use_cache=False recomputes a sliding window of the last max_seq_len tokens)"
                )
            cache.reserve(input_ids.shape[0], length)
        logits = self.decoder(
            input_ids, routing=self.routing, cache=None if cache is None else cache.kv
        ).logits
        loss = None
        if labels is not None:  # transformers convention: labels are the inputs, shifted here
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache})

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if inputs.get(CACHE_KEY) is None:  # full recompute: the model sees its last max_seq_len tokens
            window = self.decoder.cfg.max_seq_len
            inputs["input_ids"] = inputs["input_ids"][:, -window:]
            if inputs.get("attention_mask") is not None:
                inputs["attention_mask"] = inputs["attention_mask"][:, -window:]
        return inputs


class DSMoECache(Cache):
    """transformers' Cache interface over our KVCache, the one DecoderLM fills (MoA: one shared K/V per layer).

    DecoderLM writes it and advances its length in forward, so `update` (transformers' per-layer write) is
    not offered. The preallocated buffer doubles when a step would overflow it, up to `limit` tokens (the
    model's max_seq_len; past that DecoderLM refuses). Batch reordering, repeating and selecting (beam
    search, contrastive search) and cropping act on the whole buffer.
    """

    def __init__(self, kv: KVCache, limit: int):
        super().__init__(layers=[])
        self.kv, self.limit = kv, limit

    def __len__(self) -> int:
        return self.kv.k.shape[0]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        raise NotImplementedError(
            "DSMoECache is written by DSMoEForCausalLM.forward (DecoderLM's cache path)"
        )

    def reserve(self, batch: int, length: int) -> None:
        """Make room for `length` tokens of `batch` sequences (a new batch size only while empty)."""
        kv = self.kv
        if kv.k.shape[1] != batch:
            if kv.length:
                raise ValueError(f"DSMoECache holds {kv.k.shape[1]} sequences, the input has {batch}")
            self.kv = self._resized(batch, kv.max_len)
        if length > self.kv.max_len and self.kv.max_len < self.limit:
            self.kv = self._resized(batch, min(max(length, 2 * self.kv.max_len), self.limit))

    def _resized(self, batch: int, max_len: int) -> KVCache:
        old = self.kv
        L, _, n_kv, _, hd = old.k.shape
        new = KVCache(L, batch, n_kv, max_len, hd, old.k.device, old.k.dtype)
        new.k[:, :, :, : old.length] = old.k[:, :, :, : old.length]
        new.v[:, :, :, : old.length] = old.v[:, :, :, : old.length]
        new.length = old.length
        return new

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows on demand, like a DynamicCache

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.kv.length + query_length, 0

    def reset(self) -> None:
        self.kv.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.kv.length = max(0, self.kv.length + tokens_to_remove)

    def _map_batch(self, fn) -> None:
        self.kv.k, self.kv.v = fn(self.kv.k), fn(self.kv.v)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(1, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=1))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[:, indices])

    def activate_past_recording(self) -> None:
        pass  # the whole buffer is kept: crop can always roll back

    @property
    def batch_size(self) -> int:
        return self.kv.k.shape[1]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self)


class DSMoEEncoderConfig(PretrainedConfig):
    """The `config.json` of an encoder export (as DSMoEConfig; transformers wants one class per type)."""

    model_type = "dsmoe_encoder"

    def __init__(self, dsmoe: dict | None = None, routing: dict | None = None, **kwargs):
        super().__init__(**_config_kwargs(self, dsmoe, routing, kwargs))


class DSMoEEncoderForMaskedLM(PreTrainedModel):
    """EncoderMLM behind the transformers interface: padded batches in, (B, S, V) logits and the MLM loss."""

    config_class = DSMoEEncoderConfig
    base_model_prefix = "encoder"  # the export stores EncoderMLM's own keys
    _tied_weights_keys = {"encoder.lm_head.weight": "encoder.embed.weight"}
    _no_split_modules = ["EncoderBlock"]

    def __init__(self, config: DSMoEEncoderConfig):
        super().__init__(config)
        model_cfg = model_config_from_dict(config.dsmoe["model"])
        self.routing = Routing.from_dict(config.routing)
        self.encoder = EncoderMLM(model_cfg)
        self.post_init()

    def _init_weights(self, module):  # weights come from the checkpoint
        pass

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        _checked(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self):
        return self.encoder.embed

    def get_output_embeddings(self):
        return self.encoder.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask=None, labels=None, **kwargs) -> MaskedLMOutput:
        """Labels: the original token at predicted positions, -100 elsewhere (transformers convention)."""
        logits = self.encoder(input_ids, attention_mask, routing=self.routing).logits
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            )
        return MaskedLMOutput(loss=loss, logits=logits)


def _register() -> None:
    """`import dsmoe.hf` lets the Auto classes load exports without trust_remote_code. As an export's remote
    code, loaded beside an installed dsmoe, this module may find the names taken: transformers then uses
    the export's own classes through auto_map."""
    for model_type, config_class, auto_class, model_class in (
        ("dsmoe", DSMoEConfig, AutoModelForCausalLM, DSMoEForCausalLM),
        ("dsmoe_encoder", DSMoEEncoderConfig, AutoModelForMaskedLM, DSMoEEncoderForMaskedLM),
    ):
        try:
            AutoConfig.register(model_type, config_class)
            auto_class.register(config_class, model_class)
        except ValueError:
            pass


_register()
