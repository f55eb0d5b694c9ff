"""The plain single-process model: attention (plain or MoA), DS-MoE layer, dense MLP, backbones."""

from dsmoe.model.moe import DENSE, TRAINING, DSMoE, Routing, RoutingRule, mutual_information_loss
from dsmoe.model.transformer import DecoderLM, DecoderOutput, build

__all__ = [
    "DENSE",
    "TRAINING",
    "DSMoE",
    "DecoderLM",
    "DecoderOutput",
    "Routing",
    "RoutingRule",
    "build",
    "mutual_information_loss",
]
