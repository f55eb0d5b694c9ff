"""MSG growth operators (Yao et al. 2024, papers/msg.md): enlarge a DecoderLM or an EncoderMLM mid-run,
exactly preserving its function whatever the new weights are.

Every new structure enters scaled by a mask c that ramps 0 -> 1 (`Growth.set_c`); at c = 0 the grown model
computes the small model's logits and loss, and at c = 1 `Growth.finish` removes the masks. Operators:

  grow_ffn(model, width)         dense MLP width, or each DS-MoE expert's width: new hidden units x c
  grow_experts(model, n, ...)    new DS-MoE (or MoA) experts: router logits + log c, so at c = 0 the new
                                 experts get probability 0 and the old ones keep theirs
  grow_layers(model, n, where)   new blocks, gated x + c * (Block(x) - x); stacked on top or interleaved
  grow_hidden(model, d)          d_model: new channels x c after the embedding and after every block
                                 output, and a masked RMSNorm whose statistics count new channels by c

Each operator replaces parameters by larger ones holding the old values, and returns, per new parameter
name, where its old values came from (`Transfer`), for carrying optimizer state across.
Plain modules carry only inert hooks for this (`unit_mask`, `logit_bias`, `head_mask`, `channel_mask`);
while a ramp runs, blocks and norms take the Growth* classes that apply them, and `finish` restores the
plain ones.

The encoder (MosaicBERT-style EncoderMLM, post-LN or pre-LN) differs in three places:
  hidden   its norms are LayerNorms with a bias: mean subtraction and the bias make a new channel nonzero
           even when its input is 0, so every LayerNorm over d_model becomes GrowthLayerNorm, with the
           masked mean and variance of the paper AND its output x c on new channels. Everything that reads
           the residual stream reads it through such a norm (post-LN: block outputs are norm outputs;
           pre-LN: attn_norm, mlp_norm, final_norm), so at c = 0 new channels never reach an old one.
  heads    ALiBi slopes come from the head count (attention.alibi_slopes). The standard slope set for n
           heads contains the set for any smaller count, so old heads move to the head positions whose
           standard slope equals theirs, and new heads take the slopes the larger set adds: every old head
           keeps its slope exactly, and the grown model is a plain n-head ALiBi model (plan_attention,
           flash-attn, export and rebuilds all compute alibi_slopes(n), nothing stored).
  layers   new blocks are gated x + c (Block(x) - x) for post-LN too: LN(x + c f(x)) is not the identity
           at c = 0, since LN of an already normalised x is not x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsmoe.model.attention import alibi_slopes
from dsmoe.model.encoder import EncoderBlock, EncoderMLM, GrowthEncoderBlock, LayerNorm
from dsmoe.model.mlp import GATED, DenseMLP
from dsmoe.model.moe import DSMoE
from dsmoe.model.transformer import Block, DecoderLM, GrowthBlock


class GrowthRMSNorm(nn.RMSNorm):
    """RMSNorm whose mean square counts channel i with weight m_i (MSG's masked norm, for RMS): at c = 0
    the old channels see exactly the small model's statistics. Computed in fp32 (papers/msg.md)."""

    channel_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.channel_mask
        if m is None:
            return super().forward(x)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mean_square = (xf.square() * m).sum(-1, keepdim=True) / m.sum()
        return (xf * torch.rsqrt(mean_square + (self.eps or 0.0))).to(x.dtype) * self.weight


class GrowthLayerNorm(LayerNorm):
    """The encoder's LayerNorm while hidden growth ramps (MSG's masked LayerNorm): mean and variance count
    channel i with weight m_i, so at c = 0 the old channels see exactly the small model's statistics; the
    output (affine included) is x m too, since a new channel's (0 - mean) / std x w + b is not 0. fp32."""

    channel_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.channel_mask
        if m is None:
            return super().forward(x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        m = m.to(xf.dtype)
        count = m.sum()
        mean = (xf * m).sum(-1, keepdim=True) / count
        var = ((xf - mean).square() * m).sum(-1, keepdim=True) / count
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.to(xf.dtype) + self.bias.to(xf.dtype)
        return (y * m).to(dtype)


@dataclass
class Transfer:
    """Old values of a grown parameter: from `old_name`, placed at `index` along `dim` (None: same shape;
    a tuple: the same index along each of those dims, e.g. the encoder head's d_model x d_model dense)."""

    old_name: str
    dim: int | tuple[int, ...] | None = None
    index: torch.Tensor | None = None

    def kept(self, grown: torch.Tensor) -> torch.Tensor:
        """The entries of `grown` that hold the old values, in the old shape."""
        if self.dim is None:
            return grown
        for d in (self.dim,) if isinstance(self.dim, int) else self.dim:
            grown = grown.index_select(d, self.index)
        return grown

    def place(self, grown: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """A copy of `grown` with the old values written where they go (the other entries kept)."""
        if self.dim is None:
            return old.clone()
        if isinstance(self.dim, int):
            return grown.index_copy(self.dim, self.index, old)
        # Several dims: an outer product of the index along each ((0, 1): rows and columns of a matrix).
        where: list = [slice(None)] * grown.dim()
        for k, d in enumerate(self.dim):
            shape = [1] * len(self.dim)
            shape[k] = -1
            where[d] = self.index.view(shape)
        out = grown.clone()
        out[tuple(where)] = old
        return out


@dataclass
class Growth:
    """One growth event's masks; `set_c` moves them all, `finish` removes them at c = 1."""

    model: DecoderLM | EncoderMLM
    transfers: dict[str, Transfer]
    masks: list[tuple[object, str, torch.Tensor]] = field(default_factory=list)
    """(module, attribute, bool tensor of the new entries): attribute = where(new, c, 1) (or log of it)."""
    gates: list[GrowthBlock] = field(default_factory=list)
    c: float = 0.0
    event: object = None
    """The config GrowthEvent this growth came from (apply_event), if any."""

    def set_c(self, c: float) -> None:
        self.c = float(c)
        for i, (module, attr, new) in enumerate(self.masks):
            device = next(module.parameters(), new).device
            if new.device != device:  # the engine moved the model since: move the mask's pattern once
                new = new.to(device)
                self.masks[i] = (module, attr, new)
            mask = torch.where(new, torch.tensor(self.c, device=device), torch.tensor(1.0, device=device))
            setattr(module, attr, torch.log(mask) if attr == "logit_bias" else mask)
        for block in self.gates:
            block.gate = self.c

    def finish(self) -> None:
        """c must have reached 1: the masks are all ones and go, the plain classes come back."""
        if self.c != 1.0:
            raise ValueError(f"growth can only finish at c = 1 (c = {self.c})")
        for module, attr, _ in self.masks:
            setattr(module, attr, None)
        for module in self.model.modules():
            if isinstance(module, GrowthBlock):
                module.__class__ = Block
                module.__dict__.pop("gate", None)
                module.__dict__.pop("channel_mask", None)
            elif isinstance(module, GrowthEncoderBlock):
                module.__class__ = EncoderBlock
                module.__dict__.pop("gate", None)
            elif isinstance(module, GrowthRMSNorm):
                module.__class__ = nn.RMSNorm
                module.__dict__.pop("channel_mask", None)
            elif isinstance(module, GrowthLayerNorm):
                module.__class__ = LayerNorm
                module.__dict__.pop("channel_mask", None)
        self.masks, self.gates = [], []


def _grow(param: nn.Parameter, dim: int, new_size: int, old_index: torch.Tensor, init_std: float, fill=None):
    """A larger parameter: old values at old_index along dim, new entries N(0, init_std) (or `fill`)."""
    shape = list(param.shape)
    shape[dim] = new_size
    data = torch.empty(shape, dtype=param.dtype, device=param.device)
    if fill is None:
        nn.init.normal_(data, std=init_std)
    else:
        data.fill_(fill)
    data.index_copy_(dim, old_index, param.data)
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _new_mask(size: int, old_index: torch.Tensor) -> torch.Tensor:
    new = torch.ones(size, dtype=torch.bool, device=old_index.device)
    new[old_index] = False
    return new


def _set_param(model: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, value)


def _growth(model: DecoderLM, grown: dict[str, Transfer], masks: list) -> Growth:
    """The Growth of an operator that kept every parameter's name (unlisted ones keep their shape), at c = 0."""
    transfers = {name: grown.get(name, Transfer(name)) for name, _ in model.named_parameters()}
    growth = Growth(model, transfers, masks)
    growth.set_c(0.0)
    return growth


def _to_growth_blocks(model: DecoderLM) -> None:
    for block in model.blocks:
        if type(block) is Block:
            block.__class__ = GrowthBlock  # same parameters and names; the forward applies the masks


def grow_ffn(model: DecoderLM, width: int, init_std: float = 0.02) -> Growth:
    """Widen every MLP: a dense MLP to `width` hidden units, or every DS-MoE expert to `width`."""
    grown: dict[str, Transfer] = {}
    masks = []
    m = model.cfg.moe
    for i, block in enumerate(model.blocks):
        mlp, prefix = block.mlp, f"blocks.{i}.mlp"
        if isinstance(mlp, DenseMLP):
            old = mlp.w_out.weight.shape[1]
            glu = mlp.activation in GATED  # SwiGLU (decoder) or GeGLU (encoder): [gate; value] halves
            idx = torch.arange(old, device=mlp.w_out.weight.device)
            in_idx = torch.cat([idx, idx + width]) if glu else idx  # [gate; up] halves each keep their rows
            mlp.w_in.weight = _grow(mlp.w_in.weight, 0, (2 if glu else 1) * width, in_idx, init_std)
            mlp.w_out.weight = _grow(mlp.w_out.weight, 1, width, idx, init_std)
            grown[f"{prefix}.w_in.weight"] = Transfer(f"{prefix}.w_in.weight", 0, in_idx)
            grown[f"{prefix}.w_out.weight"] = Transfer(f"{prefix}.w_out.weight", 1, idx)
            masks.append((mlp, "unit_mask", _new_mask(width, idx)))
        elif isinstance(mlp, DSMoE):
            old = mlp.expert_hidden
            glu = mlp.activation == "swiglu"
            idx = torch.arange(old, device=mlp.w_out.device)
            in_idx = torch.cat([idx, idx + width]) if glu else idx
            mlp.w_in = _grow(mlp.w_in, 1, (2 if glu else 1) * width, in_idx, init_std)
            mlp.w_out = _grow(mlp.w_out, 1, width, idx, init_std)
            mlp.expert_hidden = width
            grown[f"{prefix}.w_in"] = Transfer(f"{prefix}.w_in", 1, in_idx)
            grown[f"{prefix}.w_out"] = Transfer(f"{prefix}.w_out", 1, idx)
            masks.append((mlp, "unit_mask", _new_mask(width, idx).expand(mlp.num_experts, width)))
        else:
            raise TypeError(
                f"{prefix}: cannot grow a {type(mlp).__name__} (parallel layers grow before apply)"
            )
    if model.cfg.mlp == "moe":
        m.expert_hidden = width
    else:
        m.expert_hidden = width // m.num_experts
        if width % m.num_experts:
            raise ValueError(
                f"dense width {width} must stay a multiple of model.moe.num_experts ({m.num_experts})"
            )
    return _growth(model, grown, masks)


def grow_experts(model: DecoderLM, n: int, attention: bool = False, init_std: float = 0.02) -> Growth:
    """Add experts up to `n` per layer: DS-MoE MLP experts, or MoA attention experts (`attention=True`,
    each with heads_per_expert new query heads and their output columns, and new K/V heads in whole groups
    as _grow_attention_heads says). New
    experts' router logits get + log c: at c = 0 their probability is 0 and the old ones' are unchanged."""
    grown: dict[str, Transfer] = {}
    masks = []
    for i, block in enumerate(model.blocks):
        if attention:
            attn, prefix = block.attn, f"blocks.{i}.attn"
            if attn.router is None:
                raise ValueError(
                    "grow_experts(attention=True) needs MoA attention (model.attention.experts > 0)"
                )
            old, width = attn.num_experts, attn.n_heads * attn.head_dim // attn.num_experts
            _grow_attention_heads(attn, prefix, n * width // attn.head_dim, init_std, grown)
            idx = torch.arange(old, device=attn.router.weight.device)
            attn.router.weight = _grow(attn.router.weight, 0, n, idx, init_std)
            attn.num_experts = n
            grown[f"{prefix}.router.weight"] = Transfer(f"{prefix}.router.weight", 0, idx)
            masks.append((attn.router, "logit_bias", _new_mask(n, idx)))
        else:
            mlp, prefix = block.mlp, f"blocks.{i}.mlp"
            if not isinstance(mlp, DSMoE):
                raise ValueError(f"{prefix} is not a DS-MoE layer: grow_experts needs model.mlp=moe")
            old = mlp.num_experts
            idx = torch.arange(old, device=mlp.w_in.device)
            mlp.w_in = _grow(mlp.w_in, 0, n, idx, init_std)
            mlp.w_out = _grow(mlp.w_out, 0, n, idx, init_std)
            mlp.router.weight = _grow(mlp.router.weight, 0, n, idx, init_std)
            mlp.num_experts = n
            for name in ("w_in", "w_out", "router.weight"):
                grown[f"{prefix}.{name}"] = Transfer(f"{prefix}.{name}", 0, idx)
            masks.append((mlp.router, "logit_bias", _new_mask(n, idx)))
    a = model.cfg.attention
    if attention:
        if a.heads:
            a.heads = n * a.heads_per_expert
        a.head_dim = a.head_dim or model.blocks[0].attn.head_dim
        if a.kv_heads:
            a.kv_heads = model.blocks[0].attn.n_kv_heads
        a.experts = n
    else:
        model.cfg.moe.num_experts = n
    return _growth(model, grown, masks)


def _grow_attention_heads(attn, prefix: str, n_heads: int, init_std: float, grown: dict) -> torch.Tensor:
    """Grow q/o to `n_heads` query heads of the same width. Query head h reads K/V head h // group, so new
    heads come in whole new groups with new K/V heads and every old head keeps its K/V head. Records the
    transfers in `grown`; returns the old rows of q_proj (the old heads' channels)."""
    group, hd = attn.n_heads // attn.n_kv_heads, attn.head_dim
    if n_heads <= attn.n_heads or (n_heads - attn.n_heads) % group:
        raise ValueError(
            f"{prefix}: growing to {n_heads} query heads needs more than {attn.n_heads}, in whole groups of "
            f"{group} query heads per K/V head"
        )
    kv = attn.n_kv_heads + (n_heads - attn.n_heads) // group
    dev = attn.q_proj.weight.device
    rows, kv_rows = (
        torch.arange(attn.n_heads * hd, device=dev),
        torch.arange(attn.n_kv_heads * hd, device=dev),
    )
    attn.q_proj.weight = _grow(attn.q_proj.weight, 0, n_heads * hd, rows, init_std)
    attn.o_proj.weight = _grow(attn.o_proj.weight, 1, n_heads * hd, rows, init_std)
    attn.k_proj.weight = _grow(attn.k_proj.weight, 0, kv * hd, kv_rows, init_std)
    attn.v_proj.weight = _grow(attn.v_proj.weight, 0, kv * hd, kv_rows, init_std)
    attn.n_heads, attn.n_kv_heads = n_heads, kv
    attn.q_proj.out_features = attn.o_proj.in_features = n_heads * hd
    attn.k_proj.out_features = attn.v_proj.out_features = kv * hd
    for name, index in (("q_proj", rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        grown[f"{prefix}.{name}.weight"] = Transfer(f"{prefix}.{name}.weight", 0, index)
    grown[f"{prefix}.o_proj.weight"] = Transfer(f"{prefix}.o_proj.weight", 1, rows)
    return rows


def alibi_head_positions(old: int, new: int) -> torch.Tensor:
    """Where each of `old` ALiBi heads goes among `new` so that it keeps its slope: old head h moves to the
    head whose slope in alibi_slopes(new) equals alibi_slopes(old)[h]. The standard slope set of a larger
    head count contains that of a smaller one (the 2^-8h/n powers nest; papers/msg.md: keep the old heads'
    slopes fixed); the new heads are the positions left over and take the slopes the larger set adds."""
    old_slopes, new_slopes = alibi_slopes(old).tolist(), alibi_slopes(new).tolist()
    missing = [s for s in old_slopes if s not in new_slopes]
    if new <= old or missing:
        raise ValueError(
            f"grow_heads: cannot grow {old} ALiBi heads to {new} keeping every old head's slope "
            f"(not in the new set: {missing})"
        )
    return torch.tensor([new_slopes.index(s) for s in old_slopes])


def _grow_alibi_heads(attn, prefix: str, n_heads: int, init_std: float, grown: dict) -> torch.Tensor:
    """The encoder's fused-QKV ALiBi attention to `n_heads` heads of the same width, each old head moved to
    the position whose ALiBi slope is its own (alibi_head_positions). qkv_proj rows are [q; k; v], each
    heads x head_dim; o_proj reads heads x head_dim columns. Returns the old heads' new channels."""
    hd, old = attn.head_dim, attn.n_heads
    dev = attn.o_proj.weight.device
    heads = alibi_head_positions(old, n_heads).to(dev)
    channels = (heads[:, None] * hd + torch.arange(hd, device=dev)).flatten()  # (old x hd,) in head order
    qkv_rows = torch.cat([channels + part * n_heads * hd for part in range(3)])  # old q, k, v rows
    attn.qkv_proj.weight = _grow(attn.qkv_proj.weight, 0, 3 * n_heads * hd, qkv_rows, init_std)
    attn.qkv_proj.bias = _grow(attn.qkv_proj.bias, 0, 3 * n_heads * hd, qkv_rows, init_std)
    attn.o_proj.weight = _grow(attn.o_proj.weight, 1, n_heads * hd, channels, init_std)
    attn.n_heads = n_heads
    attn.qkv_proj.out_features, attn.o_proj.in_features = 3 * n_heads * hd, n_heads * hd
    for name in ("qkv_proj.weight", "qkv_proj.bias"):
        grown[f"{prefix}.{name}"] = Transfer(f"{prefix}.{name}", 0, qkv_rows)
    grown[f"{prefix}.o_proj.weight"] = Transfer(f"{prefix}.o_proj.weight", 1, channels)
    return channels


def grow_heads(model: DecoderLM | EncoderMLM, n: int, init_std: float = 0.02) -> Growth:
    """Grow plain attention to `n` query heads of the same width. Query head h reads K/V head h // group,
    so new heads come in whole groups with new K/V heads and every old head keeps its K/V head; the new
    heads' outputs enter the output projection scaled by c. (MoA grows heads by experts: grow_experts.)
    The encoder's ALiBi heads are reordered so that each old head keeps its slope (alibi_head_positions)."""
    grown: dict[str, Transfer] = {}
    masks = []
    for i, block in enumerate(model.blocks):
        attn, prefix = block.attn, f"blocks.{i}.attn"
        if attn.router is not None:
            raise ValueError(
                "grow_heads is for plain attention; MoA grows by experts (grow_experts(attention=True))"
            )
        if isinstance(model, EncoderMLM):
            rows = _grow_alibi_heads(attn, prefix, n, init_std, grown)
        else:
            rows = _grow_attention_heads(attn, prefix, n, init_std, grown)
        masks.append((attn, "head_mask", _new_mask(n * attn.head_dim, rows)))
    a = model.cfg.attention
    a.head_dim = a.head_dim or model.blocks[0].attn.head_dim
    if isinstance(model, EncoderMLM):
        a.kv_heads = n if a.kv_heads else 0  # one K/V head per query head
    else:
        a.kv_heads = model.blocks[0].attn.n_kv_heads if a.kv_heads else 0
    a.heads = n
    return _growth(model, grown, masks)


def grow_layers(model: DecoderLM, n: int, where: str = "stack", init_std: float = 0.02) -> Growth:
    """Grow to `n` blocks: new ones stacked on top (`stack`) or each inserted after an old one
    (`interleave`, from the bottom), gated by c. New blocks are freshly initialised (any init preserves)."""
    old = len(model.blocks)
    if n <= old:
        raise ValueError(f"grow_layers: {n} layers is not more than the current {old}")
    if where == "stack":
        order = list(range(old)) + [None] * (n - old)
    elif where == "interleave":
        extra = n - old
        order = []
        for i in range(old):
            order += [i] + ([None] if i < extra else [])
        order += [None] * (n - len(order))
    else:
        raise ValueError(f"grow_layers: where must be 'stack' or 'interleave', got {where!r}")
    device = model.embed.weight.device
    encoder = isinstance(model, EncoderMLM)
    blocks, grown, new_blocks = [], {}, []
    for position, source in enumerate(order):
        if source is None:
            block = (EncoderBlock if encoder else Block)(model.cfg)
            block = block.to(device=device, dtype=model.embed.weight.dtype)
            for name, p in block.named_parameters():
                if name.endswith("norm.bias"):
                    nn.init.zeros_(p)  # LayerNorm starts as (x - mean) / std, as a fresh one does
                elif p.dim() < 2 and "norm" in name:
                    nn.init.ones_(p)
                else:
                    nn.init.normal_(p, std=init_std)  # decoder norm weights are the only other 1-d ones
            block.__class__ = GrowthEncoderBlock if encoder else GrowthBlock
            new_blocks.append(block)
        else:
            block = model.blocks[source]
            for name, _ in block.named_parameters():
                grown[f"blocks.{position}.{name}"] = Transfer(f"blocks.{source}.{name}")
        blocks.append(block)
    model.blocks = nn.ModuleList(blocks)
    model.cfg.n_layers = n
    growth = Growth(model, {k: grown.get(k) for k, _ in model.named_parameters() if k in grown})
    growth.transfers.update(  # outside the blocks (embedding, final norm, heads) nothing changes
        {k: Transfer(k) for k, _ in model.named_parameters() if not k.startswith("blocks.")}
    )
    growth.gates = new_blocks
    growth.set_c(0.0)
    return growth


def grow_hidden(model: DecoderLM | EncoderMLM, d: int, init_std: float = 0.02) -> Growth:
    """Grow d_model to `d` (heads keep their width: model.attention.head_dim is pinned). Decoder: new
    channels x c after the embedding and every block, masked RMSNorms. Encoder: masked LayerNorms whose
    outputs are x c too (GrowthLayerNorm), post-LN and pre-LN alike."""
    old = model.cfg.d_model
    if d <= old:
        raise ValueError(f"grow_hidden: {d} is not more than the current d_model {old}")
    dev = model.embed.weight.device
    idx = torch.arange(old, device=dev)
    new = _new_mask(d, idx)
    grown: dict[str, Transfer] = {}
    model.cfg.attention.head_dim = model.cfg.head_dim  # pin before d_model changes
    for name, p in list(model.named_parameters()):
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        if name.endswith("attn.q_norm.weight") or name.endswith("attn.k_norm.weight"):
            continue  # over head_dim, not d_model
        dim = _hidden_dim(name, p, old)
        if dim is None:
            continue
        # Norm weights 1 and biases 0, as a fresh norm starts; any value preserves.
        fill = 1.0 if name.endswith("norm.weight") else 0.0 if name.endswith("norm.bias") else None
        for one_dim in (dim,) if isinstance(dim, int) else dim:
            p = _grow(p, one_dim, d, idx, init_std, fill)
        _set_param(model, name, p)
        grown[name] = Transfer(name, dim, idx)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.in_features, module.out_features = module.weight.shape[1], module.weight.shape[0]
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)) and module.normalized_shape == (old,):
            module.normalized_shape = (d,)
    model.embed.embedding_dim = d
    model.cfg.d_model = d
    if isinstance(model, EncoderMLM):
        masks = []
        for module in model.modules():
            if type(module) is LayerNorm and module.normalized_shape == (d,):
                module.__class__ = GrowthLayerNorm
                masks.append((module, "channel_mask", new))
        return _growth(model, grown, masks)
    _to_growth_blocks(model)
    masks = [(model, "channel_mask", new)]
    for block in model.blocks:
        masks.append((block, "channel_mask", new))
        for norm in (block.attn_norm, block.mlp_norm):
            norm.__class__ = GrowthRMSNorm
            masks.append((norm, "channel_mask", new))
    model.final_norm.__class__ = GrowthRMSNorm
    masks.append((model.final_norm, "channel_mask", new))
    return _growth(model, grown, masks)


def _hidden_dim(name: str, p: torch.Tensor, old: int) -> int | None:
    """Which dimension of parameter `name` is d_model (None: it has none)."""
    if name == "embed.weight" or name == "lm_head.weight":
        return 1
    if name == "head_dense.weight":
        return (0, 1)  # the encoder's prediction head, (d, d)
    if p.dim() == 1:
        over_d = ("norm.weight", "norm.bias", "o_proj.bias", "mlp.w_out.bias", "head_dense.bias")
        return 0 if name.endswith(over_d) and p.shape[0] == old else None
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "qkv_proj.weight", "router.weight")):
        return 1  # (out, d)
    if name.endswith("o_proj.weight"):
        return 0  # (d, heads x head_dim)
    if name.endswith("mlp.w_in.weight"):
        return 1  # dense (F_in, d)
    if name.endswith("mlp.w_out.weight"):
        return 0  # dense (d, F)
    if name.endswith(("mlp.w_in", "mlp.w_out")):
        return 2  # experts (N, F, d)
    raise ValueError(f"grow_hidden does not know where d_model sits in {name} {tuple(p.shape)}")


def carry_state(growth: Growth, old_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter optimizer state (e.g. Adam's exp_avg, by plain parameter name, as the checkpoint shards
    hold it) for the grown model: old values in their new places, zeros for new entries and new parameters
    (MSG's transfer_states: old slices keep their moments, new ones start fresh)."""
    carried = {}
    for name, p in growth.model.named_parameters():
        t = growth.transfers.get(name)
        state = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if t is not None and t.old_name in old_state:
            old = old_state[t.old_name].to(device=p.device, dtype=state.dtype)
            state = t.place(state, old)
        carried[name] = state
    return carried


def ramp(step: int, start: int, steps: int) -> float:
    """The mask c of a growth event that started at `start` and ramps over `steps`: linear 0 -> 1."""
    return min(1.0, max(0.0, (step - start) / max(1, steps)))


def apply_event(model: DecoderLM, event, init_std: float, seed: int) -> Growth:
    """Grow `model` as a config GrowthEvent says. The new weights come from their own seeded stream, so
    every data-parallel rank (and a run replaying its schedule on resume) grows the same weights."""
    operators = {
        "hidden": lambda: grow_hidden(model, event.size, init_std),
        "ffn": lambda: grow_ffn(model, event.size, init_std),
        "heads": lambda: grow_heads(model, event.size, init_std),
        "layers": lambda: grow_layers(model, event.size, event.where, init_std),
        "experts": lambda: grow_experts(model, event.size, init_std=init_std),
        "attention_experts": lambda: grow_experts(model, event.size, attention=True, init_std=init_std),
    }
    if event.dim not in operators:
        raise ValueError(f"unknown growth dimension {event.dim!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = operators[event.dim]()
    grown.event = event
    return grown


def event_seed(base_seed: int, index: int) -> int:
    return base_seed * 1_000_003 + 7919 * (index + 1)


def replay(model: DecoderLM, growth_cfg, steps_done: int, base_seed: int) -> Growth | None:
    """The model as it was after `steps_done` optimizer steps: every event that started before that grown,
    finished ramps finished, and the ramp in progress (returned) at its c. For resuming and exporting:
    shapes and masks are replayed, weights come from the checkpoint."""
    active = None
    for i, event in enumerate(growth_cfg.events):
        if event.step >= steps_done:
            break
        active = apply_event(model, event, growth_cfg.init_std, event_seed(base_seed, i))
        active.set_c(ramp(steps_done, event.step, event.ramp_steps))
        if active.c == 1.0:
            active.finish()
            active = None
    return active


def in_progress(model: nn.Module) -> bool:
    """Whether a growth ramp is under way in `model` (masks present)."""
    growth_classes = (GrowthBlock, GrowthEncoderBlock, GrowthRMSNorm, GrowthLayerNorm)
    return any(isinstance(m, growth_classes) for m in model.modules()) or any(
        getattr(m, attr, None) is not None
        for m in model.modules()
        for attr in ("unit_mask", "logit_bias", "head_mask", "channel_mask")
    )


__all__ = [
    "Growth",
    "apply_event",
    "carry_state",
    "in_progress",
    "replay",
    "GrowthLayerNorm",
    "GrowthRMSNorm",
    "Transfer",
    "grow_experts",
    "grow_ffn",
    "grow_heads",
    "grow_hidden",
    "grow_layers",
    "ramp",
]


def final_model_config(cfg):
    """The ModelConfig a growth schedule ends at (every event applied): the shape a from-scratch baseline of
    the grown run must have. Built on CPU and thrown away; only the config is kept."""
    import copy

    from dsmoe.model import build

    start = copy.deepcopy(cfg.model)
    start.vocab_size = start.vocab_size or 64  # set from the tokenizer later; growth never changes it
    with torch.random.fork_rng(devices=[]):
        model = build(start)
        for i, event in enumerate(cfg.growth.events):
            grown = apply_event(model, event, cfg.growth.init_std, event_seed(cfg.train.seed, i))
            grown.set_c(1.0)
            grown.finish()
    final = copy.deepcopy(model.cfg)
    final.vocab_size = cfg.model.vocab_size
    return final
