"""transformers integration: an exported dsmoe directory loads with the Auto classes.

    import dsmoe.hf  # registers model_type "dsmoe" with AutoConfig / AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/tiny")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file="out/tiny/tokenizer.json")
    model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=40)

The wrapped model is our DecoderLM, running the routing rule saved in the export (sparse MLP experts,
by default every attention expert). No weights are converted: the export's safetensors load as they are.
Generation recomputes the whole prefix each step (no KV cache yet).

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
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

from dsmoe import config as config_lib
from dsmoe.model import DecoderLM, EncoderMLM, Routing


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


class DSMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """DecoderLM behind the transformers interface (logits, loss with shifted labels, generate)."""

    config_class = DSMoEConfig
    base_model_prefix = "decoder"  # the export stores DecoderLM's own keys; transformers adds the prefix
    _tied_weights_keys = {"decoder.lm_head.weight": "decoder.embed.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: DSMoEConfig):
        super().__init__(config)
        cfg = config_lib.from_dict(config.dsmoe, source="config.json (dsmoe)")
        self.routing = Routing.from_dict(config.routing)
        self.decoder = DecoderLM(cfg.model)
        self.post_init()

    def _init_weights(self, module):  # weights come from the checkpoint; DecoderLM initialises its own
        pass

    def get_input_embeddings(self):
        return self.decoder.embed

    def get_output_embeddings(self):
        return self.decoder.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask=None, labels=None, **kwargs) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("dsmoe models take unpadded batches (attention_mask must be all ones)")
        logits = self.decoder(input_ids, routing=self.routing).logits
        loss = None
        if labels is not None:  # transformers convention: labels are the inputs, shifted here
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        window = self.decoder.cfg.max_seq_len
        return {"input_ids": input_ids[:, -window:]}


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
        cfg = config_lib.from_dict(config.dsmoe, source="config.json (dsmoe)")
        self.routing = Routing.from_dict(config.routing)
        self.encoder = EncoderMLM(cfg.model)
        self.post_init()

    def _init_weights(self, module):  # weights come from the checkpoint
        pass

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


AutoConfig.register("dsmoe", DSMoEConfig)
AutoModelForCausalLM.register(DSMoEConfig, DSMoEForCausalLM)
AutoConfig.register("dsmoe_encoder", DSMoEEncoderConfig)
AutoModelForMaskedLM.register(DSMoEEncoderConfig, DSMoEEncoderForMaskedLM)
