"""The plain single-process model: attention (plain or MoA), DS-MoE layer, dense MLP, backbones."""

from dsmoe.model.config import ModelConfig
from dsmoe.model.encoder import EncoderMLM, EncoderOutput
from dsmoe.model.moe import DENSE, TRAINING, DSMoE, Routing, RoutingRule, mutual_information_loss
from dsmoe.model.transformer import DecoderLM, DecoderOutput
from dsmoe.model.transformer import build as build_decoder


def build(cfg: ModelConfig) -> DecoderLM | EncoderMLM:
    """Build the single-process model of `cfg.backbone` (vocab_size already resolved)."""
    return EncoderMLM(cfg) if cfg.backbone == "encoder" else build_decoder(cfg)


__all__ = [
    "DENSE",
    "TRAINING",
    "DSMoE",
    "DecoderLM",
    "DecoderOutput",
    "EncoderMLM",
    "EncoderOutput",
    "Routing",
    "RoutingRule",
    "build",
    "mutual_information_loss",
]
