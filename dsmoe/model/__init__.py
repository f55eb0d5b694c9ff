"""The plain single-process model: attention, DS-MoE layer, dense MLP, backbones."""

from dsmoe.model.moe import DENSE, DSMoE, RoutingRule, mutual_information_loss
from dsmoe.model.transformer import DecoderLM, DecoderOutput, build

__all__ = ["DENSE", "DSMoE", "DecoderLM", "DecoderOutput", "RoutingRule", "build", "mutual_information_loss"]
