"""Everything that knows about ranks: process groups and the DeepSpeed engine."""
