"""dsmoe: distributed DS-MoE pretraining (dense training of all experts, sparse inference)."""

__version__ = "0.1.0"
