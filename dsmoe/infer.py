"""Sparse inference: load an exported model or a run, and measure held-out perplexity under a routing rule."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

from dsmoe import config as config_lib
from dsmoe.evaluation import EvalResult, HeldOut, evaluate

# held_out_tokens, MLMResult and mlm_loss are dsmoe.evaluation's (it may not import this module: they were here
# once, a cycle); named here too for the code that imports them from here (dsmoe/train/report.py, tests, tools)
from dsmoe.evaluation import MLMResult as MLMResult
from dsmoe.evaluation import held_out_tokens as held_out_tokens
from dsmoe.evaluation import mlm_loss as mlm_loss
from dsmoe.export import is_export, load_export, load_from_run
from dsmoe.model import TRAINING, DecoderLM, Routing, RoutingRule
from dsmoe.model.attention import ATTENTION_BACKENDS, apply_rope, causal_mask, rope_cos_sin
from dsmoe.model.decode_attention import decode_attention, decode_attention_reference
from dsmoe.model.moe import THRESHOLD_MODES, kept_weights, select_experts, top_k_table
from dsmoe.model.router import fp32_scores_available, router_scores
from dsmoe.model.sparse import (
    GEMV_MAX_TOKENS,
    gemv_routed_partials,
    gemv_topk_partials,
    masked_path_available,
    moe_topk_forward,
    pick_path,
    triton_available,
)


@dataclass
class LoadedModel:
    model: DecoderLM
    cfg: config_lib.Config
    routing: Routing
    """The rule the model was exported with (dense for a run directory)."""
    tokenizer_path: Path


def load(path: str | Path, trust_pickle: bool = False) -> LoadedModel:
    """An exported model directory (config.json) or a run directory (checkpoints/; `trust_pickle` for one
    saved before 2026-12-02, see dsmoe.train.checkpoint)."""
    path = Path(path)
    model_dir = (path / "config.json").is_file() and not (path / "checkpoints").is_dir()
    if is_export(path) or model_dir:  # an export, sound or not (check_export says which file is wrong)
        model, cfg, routing, tok = load_export(path)
    else:
        model, cfg, tok, _ = load_from_run(path, trust_pickle=trust_pickle)
        routing = Routing()
    return LoadedModel(model, cfg, routing, tok)


PerplexityResult = EvalResult  # the name the tools and the report have used


def perplexity(
    model: DecoderLM, tokens, seq_len: int, routing: Routing, max_tokens: int = 0, batch_size: int = 16
) -> EvalResult:
    """exp(mean next-token NLL) over consecutive held-out windows of `seq_len`, and the active shares."""
    return evaluate(model, HeldOut.from_tokens(tokens, seq_len, max_tokens), routing, batch_size)


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator=None
) -> torch.Tensor:
    """(B, V) last-position logits -> (B, 1) next tokens. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(
    model: DecoderLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    routing: Routing = TRAINING,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batched sampling with a KV cache: one prefill of the (B, T) prompts, then one token per step.

    Prompts in a batch share one length (no padding). Stops early when every sequence emitted eos_id.
    """
    model.eval()
    B, T = prompt.shape
    total = min(T + max_new_tokens, model.cfg.max_seq_len)
    cache = model.new_cache(B, total)
    logits = model(prompt, routing=routing, cache=cache).logits[:, -1]
    return _sample_tokens(
        prompt,
        logits,
        lambda token: model(token, routing=routing, cache=cache).logits[:, -1],
        total - T,
        temperature,
        top_k,
        top_p,
        eos_id,
        generator,
    )


def _sample_tokens(
    prompt, logits, decode, steps, temperature, top_k, top_p, eos_id, generator
) -> torch.Tensor:
    """The sampling loop both generators share: sample from logits, append, decode the token for the next
    logits; at most `steps` new tokens, fewer when every sequence has emitted eos_id."""
    tokens, finished = [prompt], torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for step in range(steps):
        next_token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_token = next_token.masked_fill(finished.unsqueeze(-1), eos_id)
            finished |= next_token.squeeze(-1) == eos_id
        tokens.append(next_token)
        if step == steps - 1 or (eos_id is not None and bool(finished.all())):  # no host sync without eos
            break
        logits = decode(next_token)
    return torch.cat(tokens, dim=1)


def in_growth_ramp(model: DecoderLM) -> bool:
    """Whether MSG growth masks or gates are still on the model (a checkpoint saved mid-ramp): the Engine's
    fused decode does not apply them; dsmoe.infer.generate does."""
    return model.channel_mask is not None or any(
        getattr(b, "channel_mask", None) is not None
        or getattr(b, "gate", None) is not None
        or b.attn.head_mask is not None
        or getattr(b.mlp, "unit_mask", None) is not None
        or (b.attn.router is not None and b.attn.router.logit_bias is not None)
        or (getattr(b.mlp, "routed", False) and b.mlp.router.logit_bias is not None)
        for b in model.blocks
    )


HOPPER_SPARSE_OVER_DENSE = {
    "top_k": ((1, 1.33), (64, 0.58), (16384, 1.42)),
    "threshold": ((1, 1.21), (64, 0.54), (16384, 1.15)),
}
SPARSE_OVER_DENSE: dict[str, dict[str, tuple[tuple[int, float], ...]]] = {
    "H100": HOPPER_SPARSE_OVER_DENSE,
    "H200": HOPPER_SPARSE_OVER_DENSE,
}
"""Whole-model speed of the sparse expert paths over dense (all experts) at a number of tokens per forward, by
device and rule family: DS-MoE-1B, bf16, compiled segments; top-K at K=4, threshold at eps 1; 1 token =
decode at batch 1, 64 = decode at batch 64, 16384 = prefill 8 x 2048. Measured on one H100 on 2026-12-07
(`python benchmarks/bench_infer.py --compile --quick --skip-hf --combine sparse`, commit 37b972b:
benchmarks/infer23_h100/sparse_37b972b.md; the runs at b294aef and 5843cef gave the same choices, threshold
decode at batch 1 0.98-0.99x before the rule's mask moved into the compiled segment); batch 1 and prefill
updated with the gather-GEMV's swept tiles (ca73201, benchmarks/infer23_h100/auto_tiles_ca73201.md). H200 takes the same
table: its last measurement (2026-12-02, 37192cf, top-K 1.17 / 0.57 / 1.52) led to the same choices, and its
threshold figures predate the sync-free threshold path. Where the sparse path ran slower than dense, the
Engine computes every expert and combines them with the rule's weights instead: the same function at dense cost."""


def dense_combine_wins(rule: RoutingRule, tokens: int, device: torch.device) -> bool:
    """Whether `rule` runs faster as every expert combined with its weights (zero for dropped experts) than on
    its sparse path, for `tokens` tokens a forward on `device`: by the measured point of SPARSE_OVER_DENSE
    nearest in log(tokens). Devices without a table keep the sparse path."""
    if rule.mode == "dense" or device.type != "cuda":
        return False
    name = torch.cuda.get_device_name(device)
    table = next((t for key, t in SPARSE_OVER_DENSE.items() if key in name), None)
    if table is None:
        return False
    points = table["top_k" if rule.mode == "top_k" else "threshold"]
    _, ratio = min(points, key=lambda p: abs(math.log(p[0]) - math.log(max(tokens, 1))))
    return ratio < 1.0


class Engine:
    """Fast generation over a DecoderLM's own weights (nothing copied): a static KV cache, no routing
    statistics, sync-free top-K MLP experts (dsmoe/model/sparse.py) and, on CUDA, each decode step
    replayed as one captured CUDA graph.

    The cache is preallocated for `batch` sequences of `max_len` tokens, so a decode step has fixed shapes:
    the new token's position is a device tensor, its K/V are written there, and attention reads the whole
    cache with the positions after it masked. Every attention expert runs (the paper's rule; routing
    .attention must be dense); the MLP takes routing.mlp: top-K is graph-safe; so are the threshold rules,
    as a masked table of every pair on the gather-GEMV (few tokens on CUDA: dropped pairs read nothing) or
    every pair in a fixed slot of grouped GEMMs (dsmoe.model.sparse.moe_masked_forward: bf16 on Hopper,
    CPU); elsewhere they keep a variable number of pairs, with a host sync per layer, and run eagerly.
    Prefill returns the last position's logits unless asked for all. `compile` runs the per-layer
    segments of prefill and decode through torch.compile (fewer, fused kernels).

    `combine` picks how a sparse rule's experts run: 'sparse' (only the kept experts), 'dense' (every expert,
    combined with the rule's weights, zero for the dropped ones: the same function at dense cost), or None: per
    forward, whichever SPARSE_OVER_DENSE measured faster on this device at that many tokens.
    `attention_kernel` runs decode attention as split-K Triton kernels that read only the cache's rows up to
    the position (dsmoe.model.decode_attention), so a step's attention costs the tokens so far, not max_len.
    None (the default): on CUDA where triton imports; the torch version elsewhere.
    """

    def __init__(
        self,
        model: DecoderLM,
        routing: Routing = TRAINING,
        batch: int = 1,
        max_len: int | None = None,
        cuda_graph: bool | None = None,
        expert_path: str | None = None,
        compile: bool = False,
        combine: str | None = None,
        attention_kernel: bool | None = None,
    ):
        cfg = model.cfg
        if combine not in (None, "sparse", "dense"):
            raise ValueError(f"combine must be 'sparse', 'dense' or None (measured choice), got {combine!r}")
        if cfg.is_encoder:
            raise ValueError("Engine generates with decoders; an encoder has no next-token logits")
        if routing.attention.mode != "dense":
            raise ValueError(
                f"Engine keeps every attention expert (the paper's rule): routing.attention must be dense, "
                f"got {routing.attention}"
            )
        if in_growth_ramp(model):
            raise ValueError("Engine runs finished models: this one is in the middle of a growth ramp")
        self.model, self.routing, self.expert_path = model.eval(), routing, expert_path
        weight = model.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.batch, self.max_len = batch, max_len or cfg.max_seq_len
        if self.max_len > cfg.max_seq_len:
            raise ValueError(f"max_len {self.max_len} exceeds model.max_seq_len {cfg.max_seq_len}")
        shape = (cfg.n_layers, batch, cfg.attention.num_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.cos, self.sin = rope_cos_sin(self.max_len, cfg.head_dim, cfg.attention.rope_theta, self.device)
        self.positions = torch.arange(self.max_len, device=self.device)
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)  # the decode step's position
        self.length = 0
        # A decode step is graph-safe when nothing in it syncs with the host: dense routing, or top-K on an
        # expert path with fixed shapes (the portable loop reads per-expert counts on the host).
        probe = torch.empty(batch, cfg.d_model, device=self.device, dtype=self.dtype)
        with torch.no_grad():  # decode steps run without autograd
            picked = pick_path(probe)
        path = expert_path or picked
        self.combine = combine
        with torch.no_grad():
            self._decode_combine = self._combine_for(probe)
        # Every expert of each token, the (T, E) pair table of a 'masked' combine (as many rows as the
        # gather-GEMV takes tokens, made once: a fresh table is one more launch a layer).
        self._expert_ids = (
            torch.arange(model.moe_layers[0].num_experts, device=self.device).repeat(
                max(batch, GEMV_MAX_TOKENS), 1
            )
            if model.moe_layers and routing.mlp.mode in THRESHOLD_MODES
            else None
        )
        # Threshold rules keep a variable number of experts: graph-safe as a masked table on the gather-GEMV.
        graph_safe = (
            routing.mlp.mode == "dense"
            or self._decode_combine == "dense"
            or (routing.mlp.mode == "top_k" and path != "loop")
            or (routing.mlp.mode in THRESHOLD_MODES and (path == "gemv" or masked_path_available(probe)))
        )
        self.cuda_graph = (self.device.type == "cuda" and graph_safe) if cuda_graph is None else cuda_graph
        if self.cuda_graph and not graph_safe:
            raise ValueError(
                f"routing {routing.mlp} on the '{path}' expert path syncs with the host: it cannot run in a "
                "CUDA graph (pass cuda_graph=False)"
            )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.static_logits: torch.Tensor | None = None
        self._layers = [_layer_weights(b) for b in model.blocks]
        a = cfg.attention
        self._top_k = _decode_top_k(model, routing.mlp)
        self._pre = functools.partial(
            _segment_pre, eps=cfg.norm_eps, n_heads=a.num_heads, n_kv=a.num_kv_heads, head_dim=cfg.head_dim
        )
        # The post segments return the top-K table on the sparse path, or every probability (threshold rules);
        # for a 'dense' or 'masked' combine, the rule's weights of every expert, masked inside the segment
        # (eager, the mask's few small kernels cost 5-16% of a batch-64 decode step on H100, and four launches
        # a layer of a threshold decode step on the gather-GEMV).
        rule = routing.mlp if routing.mlp.mode != "dense" else None
        self._post = {
            "sparse": functools.partial(_segment_post, eps=cfg.norm_eps, top_k=self._top_k),
            "weights": functools.partial(_segment_post, eps=cfg.norm_eps, top_k=0, combine_rule=rule),
        }
        weights = self._decode_combine != "sparse"
        decode_k = 0 if weights else self._top_k
        # Decode attention over only the cache's filled rows (the torch version reads all max_len): the
        # default on CUDA (benchmarks/decode_attention_h100.md: 1.08x a batch-1 step, 2.34x at batch 64).
        if attention_kernel is None:
            attention_kernel = self.device.type == "cuda" and triton_available()
        if attention_kernel and not (self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("attention_kernel: the split-K decode attention is a Triton kernel, for CUDA")
        if attention_kernel and not triton_available():
            raise ValueError("attention_kernel: the split-K decode attention needs triton")
        self.attention_kernel = attention_kernel
        # Few tokens on CUDA, top-K: the post segment ends with the router's fp32 scores, and the gather-GEMV's
        # up kernel takes each pair's softmax and top-K from them (no launch of the routing's own).
        self._fused_route = bool(decode_k) and expert_path in (None, "gemv") and picked == "gemv"
        self._decode_post = functools.partial(
            _decode_post, eps=cfg.norm_eps, top_k=decode_k, combine_rule=rule if weights else None,
            attention_kernel=self.attention_kernel, route_in_experts=self._fused_route,
        )  # fmt: skip
        if compile:  # fuse each segment's small kernels; every layer reuses the code
            # one version per (batch, K, first layer or not, prefill length): more than dynamo's default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._pre = torch.compile(self._pre)
            self._post = {k: torch.compile(post) for k, post in self._post.items()}
            self._decode_post = torch.compile(self._decode_post)

    def _dense_combine(self, tokens: int) -> bool:
        """Whether a forward of `tokens` tokens runs the rule as every expert combined with its weights."""
        if self.routing.mlp.mode == "dense" or not self.model.moe_layers:
            return False  # nothing to choose (an SMoE's dense rule runs its trained top-K: sparse)
        if self.combine is not None:
            return self.combine == "dense"
        return dense_combine_wins(self.routing.mlp, tokens, self.device)

    def _combine_for(self, x_TD: torch.Tensor) -> str:
        """How a forward of these (T, D) tokens runs the MLP experts: 'dense' (every expert, the rule's
        weights), 'masked' (a threshold rule on the gather-GEMV: the rule's weight of every expert from the
        compiled segment, a fixed (T, E) table whose zero-weight pairs read nothing), or 'sparse'."""
        if self._dense_combine(x_TD.shape[0]):
            return "dense"
        if self.routing.mlp.mode in THRESHOLD_MODES and self.model.moe_layers:
            if (self.expert_path or pick_path(x_TD)) == "gemv":
                return "masked"
        return "sparse"

    def reset(self) -> None:
        """Forget the cached tokens (the captured graph stays valid: it reads the position tensor)."""
        self.length = 0

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """(B, T) tokens continuing the cached ones -> (B, V) last-position logits, or (B, T, V)."""
        B, T = idx.shape
        self._check(B, T)
        logits = self._forward(idx, start=self.length, last_only=not all_logits)
        self.length += T
        return logits if all_logits else logits[:, -1]

    @torch.no_grad()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """(B, 1) next tokens -> (B, V) logits; a captured CUDA graph replays on CUDA."""
        self._check(token.shape[0], 1)
        self.pos.fill_(self.length)
        if not self.cuda_graph:
            logits = self._forward(token, pos=self.pos)[:, -1]
        else:
            self.static_token.copy_(token)
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.static_logits.clone()  # the next replay overwrites the graph's buffer
        self.length += 1
        return logits

    def _check(self, batch: int, new: int) -> None:
        if batch != self.batch:
            raise ValueError(f"Engine was built for batch {self.batch}, got {batch}")
        if self.length + new > self.max_len:
            raise ValueError(
                f"sequence length {self.length + new} exceeds the engine's max_len {self.max_len}"
            )

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (Triton compiles, cuBLAS handles) off the capture
            for _ in range(2):
                self._forward(self.static_token, pos=self.pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_logits = self._forward(self.static_token, pos=self.pos)[:, -1]
        self.graph = graph  # only a capture that succeeded is replayed

    def _forward(self, idx, start: int = 0, pos: torch.Tensor | None = None, last_only: bool = True):
        """Prefill (T tokens at positions start..) or, with `pos`, one decode token per sequence. Per layer a
        `pre` segment (previous MLP's residual, norm, projections, QK-norm, RoPE), the new K/V written into
        the static cache, attention, a `post` segment (MoA scaling, output projection, residual, norm,
        router, top-K), then the experts. The segments are pure functions of tensors, so one compiled
        version serves every layer."""
        model = self.model
        x = model.embed(idx)  # (B, T, D)
        B, T = idx.shape
        if pos is not None:  # decode: the new token's position is a device tensor (graph replays move it)
            cos, sin = self.cos.index_select(0, pos.view(1)), self.sin.index_select(0, pos.view(1))
        else:
            cos, sin = self.cos[start : start + T], self.sin[start : start + T]
            causal, mask = causal_mask(T, start, self.device)
        combine = self._decode_combine if pos is not None else self._combine_for(x.view(B * T, -1))
        post = self._post["sparse" if combine == "sparse" else "weights"]
        carry = None
        for layer, (block, w) in enumerate(zip(model.blocks, self._layers, strict=True)):
            renormalize = block.mlp.renormalize if w.mlp_router is not None else False
            if pos is not None:  # the pre segment writes the new K/V into the cache
                x, h, q, _, _, scores = self._pre(
                    x, carry, w.attn_norm, w.qkv, w.q_norm, w.k_norm, cos, sin,
                    self.k[layer], self.v[layer], pos,
                )  # fmt: skip
                x, h, gate, experts = self._decode_post(
                    x, h, q, self.k[layer], self.v[layer], pos, self.positions, w.o, scores,
                    w.mlp_norm, w.mlp_router, renormalize,
                )  # fmt: skip
            else:
                x, h, q, k, v, _ = self._pre(x, carry, w.attn_norm, w.qkv, w.q_norm, w.k_norm, cos, sin)
                self.k[layer, :, :, start : start + T] = k
                self.v[layer, :, :, start : start + T] = v
                keys, values = self.k[layer, :, :, : start + T], self.v[layer, :, :, : start + T]
                y = ATTENTION_BACKENDS[block.attn.backend](q, keys, values, causal=causal, mask=mask)
                x, h, gate, experts = post(
                    x, h, y.transpose(1, 2).reshape(B, T, -1), w.o, w.attn_router, w.mlp_norm,
                    w.mlp_router, renormalize,
                )  # fmt: skip
            carry = self._experts(block.mlp, h, gate, experts, fused_route=pos is not None, combine=combine)
        x = _add_carry(x, carry)
        if last_only:
            x = x[:, -1:]
        return model.lm_head(model.final_norm(x))

    def _experts(self, mlp, h, gate, experts, fused_route: bool, combine: str = "sparse") -> torch.Tensor:
        """The MLP's output for its input h, from the post segment's routing: (weights, ids) of the top K,
        or every expert's probability (dense and threshold rules), or for a 'dense' or 'masked' combine
        every expert's weight under the rule (masked in the segment), or nothing (a dense MLP), or on a
        decode step's fused route the router's scores, which the gather-GEMV's up kernel routes by."""
        if not getattr(mlp, "routed", False):
            return mlp(h)[0]
        x_TD = h.reshape(-1, h.shape[-1])
        if combine == "dense":  # every expert, gate holding the rule's weights (zero where it drops one)
            return mlp._dense_forward(x_TD, gate).view_as(h)
        if combine == "masked":  # the gather-GEMV over every pair, reading the kept ones' rows only
            T, ids = x_TD.shape[0], self._expert_ids
            # More tokens than the table's rows only where a gemv path is forced on a prefill.
            ids = ids[:T] if T <= len(ids) else ids[:1].expand(T, -1)
            partials = gemv_topk_partials(x_TD, gate, ids, mlp.w_in, mlp.w_out, mlp.activation)
            return partials.view(-1, *h.shape)
        if fused_route and self._fused_route:  # gate holds the router's scores; the up kernel routes
            partials = gemv_routed_partials(
                x_TD, gate, self._top_k, mlp.renormalize, mlp.w_in, mlp.w_out, mlp.activation
            )
            return partials.view(-1, *h.shape)
        if experts is None:  # gate holds every expert's probability
            rule = self.routing.mlp
            if (
                rule.mode in THRESHOLD_MODES
            ):  # every pair in a fixed slot of grouped GEMMs (moe_masked_forward)
                return mlp._sparse_forward(x_TD, gate, rule, mlp.renormalize)[0].view_as(h)
            return mlp._dense_forward(x_TD, gate).view_as(h)
        path = self.expert_path or pick_path(x_TD)
        if path == "gemv":  # fp32 partial sums (S, B, T, D): the next segment adds them up (_add_carry)
            partials = gemv_topk_partials(x_TD, gate, experts, mlp.w_in, mlp.w_out, mlp.activation)
            return partials.view(-1, *h.shape)
        y_TD = moe_topk_forward(x_TD, gate, experts, mlp.w_in, mlp.w_out, mlp.activation, path)
        return y_TD.view_as(h)


@dataclass
class _LayerWeights:
    """One block's tensors, as the decode segments take them (None where the block has no such part)."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor
    """W_q, W_k, W_v and a MoA layer's router W_r stacked (a copy made when the Engine loads): one GEMM for
    the three projections, and at decode for the attention router's scores too."""
    o: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    attn_router: torch.Tensor | None
    mlp_norm: torch.Tensor
    mlp_router: torch.Tensor | None


def _layer_weights(block) -> _LayerWeights:
    attn, routed = block.attn, getattr(block.mlp, "routed", False)
    router = [attn.router.weight] if attn.router is not None else []
    return _LayerWeights(
        block.attn_norm.weight,
        torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, *router]).detach(),
        attn.o_proj.weight,
        attn.q_norm.weight if attn.q_norm is not None else None,
        attn.k_norm.weight if attn.k_norm is not None else None,
        attn.router.weight if attn.router is not None else None,
        block.mlp_norm.weight,
        block.mlp.router.weight if routed else None,
    )


def _decode_top_k(model: DecoderLM, rule: RoutingRule) -> int:
    """K of the decode segments' top-K (0: every expert, the dense MLP forward)."""
    layers = model.moe_layers
    if not layers:
        return 0
    train_top_k, experts = layers[0].train_top_k, layers[0].num_experts
    if rule.mode == "dense":
        return train_top_k  # an SMoE runs as it was trained
    return min(rule.k, experts) if rule.mode == "top_k" else 0


def _add_carry(x: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """The residual add of the previous MLP's output: (B, T, D) in x's dtype, or the gather-GEMV's fp32
    partial sums (S, B, T, D), summed and rounded here (inside a compiled segment: one kernel with the
    add and the next norm instead of a reduction of its own)."""
    if carry is None:
        return x
    if carry.dim() == x.dim() + 1:
        carry = carry.sum(0).to(x.dtype)
    return x + carry


def _segment_pre(
    x, carry, attn_norm, qkv_w, q_norm, k_norm, cos, sin, k_cache=None, v_cache=None, pos=None,
    *, eps, n_heads, n_kv, head_dim,
):  # fmt: skip
    """Residual of the previous MLP, attention norm, the Q/K/V projections as one GEMM, QK-norm, RoPE of T
    new tokens per row. Returns x, h, q (B, H, T, hd), k, v (B, KV, T, hd) and the MoA router's fp32
    scores or None.

    A decode step (`pos`) also writes its K/V into the cache here, where inductor folds the two writes into
    the kernel that makes them (the pattern of gpt-fast's cache) instead of two launches of their own, and
    takes a MoA layer's router scores from the same GEMM as Q/K/V: its rows follow W_v in qkv_w, and the
    GEMM writes fp32 (Fp32Scores' one low-precision GEMM), which Q/K/V round to the model's dtype as a
    GEMM writing it would. Prefill keeps the router in the post segment (its fp32 Q/K/V would be ~2x the
    bytes of 16k rows)."""
    x = _add_carry(x, carry)
    B, T = x.shape[:2]
    h = F.rms_norm(x, (x.shape[-1],), attn_norm, eps)
    rows = (n_heads + 2 * n_kv) * head_dim
    router = pos is not None and qkv_w.shape[0] > rows  # a MoA layer's decode step
    if router and fp32_scores_available(h.view(B * T, -1), qkv_w):
        out = torch.mm(h.view(B * T, -1), qkv_w.t(), out_dtype=torch.float32)
        qkv, scores = out[:, :rows].to(h.dtype).view(B, T, rows), out[:, rows:]
    else:
        qkv = h @ qkv_w[:rows].T
        scores = router_scores(h.reshape(B * T, -1), qkv_w[rows:]) if router else None
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(B, T, n_heads, head_dim)
    k = k.view(B, T, n_kv, head_dim)
    if q_norm is not None:
        q = F.rms_norm(q, (head_dim,), q_norm, eps)
        k = F.rms_norm(k, (head_dim,), k_norm, eps)
    v = v.reshape(B, T, n_kv, head_dim).transpose(1, 2)
    q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
    if pos is not None:
        k_cache.index_copy_(2, pos.view(1), k)
        v_cache.index_copy_(2, pos.view(1), v)
    return x, h, q, k, v, scores


def _router_probs(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dsmoe.model.router.Router's probabilities: its fp32 scores (`_segment_router_scores`) and softmax."""
    return F.softmax(_segment_router_scores(h, weight), dim=-1)


def _segment_router_scores(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A router's fp32 scores (T, E) of h (..., D) inside a segment. Compiled, for a decode step's few tokens:
    the products summed in fp32 (exact products of bf16 values, as the GEMM's), which inductor makes one small
    reduction kernel; cuBLAS's GEMM writing fp32 took 5.1 us of a 54 us batch-1 layer there for 128 KB of
    weight (benchmarks/infer23_h100/README.md). Otherwise router_scores: one bf16 GEMM writing fp32 on CUDA
    (an fp32 copy of the (T, D) activations and an fp32 GEMM cost 3.9 of a 52 ms 8 x 2048 prefill)."""
    h_TD = h.reshape(-1, h.shape[-1])
    if torch.compiler.is_compiling() and h_TD.shape[0] <= GEMV_MAX_TOKENS:
        dtype = torch.promote_types(h_TD.dtype, torch.float32)  # fp64 models stay fp64, as router_scores
        return (h_TD.to(dtype).unsqueeze(1) * weight.to(dtype)).sum(-1)
    return router_scores(h_TD, weight)


def _segment_post(
    x, h, y, o_w, attn_router, mlp_norm, mlp_router, renormalize, attn_scores=None,
    *, eps, top_k, combine_rule=None, route_in_experts=False,
):  # fmt: skip
    """After attention (y: (B, T, H x hd)): MoA scaling (every expert kept; its router's scores given, or
    computed here from h), output projection and residual; MLP norm and router. Returns x, the MLP input,
    and either (weights, expert ids) of the top K or (all probabilities, None), or with `combine_rule`
    (every expert's weight under that rule, None), or with `route_in_experts` (the router's fp32 scores,
    None: the gather-GEMV's up kernel takes the top K); (None, None) without a router."""
    B, T = x.shape[:2]
    if attn_scores is not None or attn_router is not None:
        probs = F.softmax(attn_scores, dim=-1) if attn_scores is not None else _router_probs(h, attn_router)
        y = (y.view(B, T, probs.shape[-1], -1) * probs.view(B, T, -1, 1).to(y.dtype)).view(B, T, -1)
    x = x + y @ o_w.T
    h = F.rms_norm(x, (x.shape[-1],), mlp_norm, eps)
    if mlp_router is None:
        return x, h, None, None
    if route_in_experts:
        return x, h, _segment_router_scores(h, mlp_router), None
    probs = _router_probs(h, mlp_router)
    if combine_rule is not None:
        keep = (
            top_k_mask(probs, combine_rule.k)
            if combine_rule.mode == "top_k"
            else select_experts(probs, combine_rule)
        )
        return x, h, kept_weights(probs, keep, renormalize), None
    if not top_k:
        return x, h, probs, None
    return (x, h, *top_k_table(probs, top_k, renormalize))


def top_k_mask(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """(T, E) bool, each token's k largest probabilities (ties to the lower expert index), picked one at a
    time: k rounds of a max and a first-index min over each token's E probabilities. Every reduction runs
    over the same (T, E) as the softmax before it, which lets inductor's Triton backend (it groups kernels by
    numel and reduction size) make one kernel of both. The E x E pairwise rank this replaces reduced over
    (T * E, E), which cannot join them (decode batch 64 combined densely ran 0.98x dense with it, H100; the
    new mask is not yet timed: bench_infer's batch-64 profiles show its kernels). topk and a scatter took two
    kernels of their own (12%, 5843cef)."""
    E = probs_TE.shape[-1]
    if k >= E:
        return torch.ones_like(probs_TE, dtype=torch.bool)
    index = torch.arange(E, device=probs_TE.device)
    keep = torch.zeros_like(probs_TE, dtype=torch.bool)
    remaining = probs_TE
    for _ in range(k):
        best = remaining.amax(-1, keepdim=True)
        first = torch.where(remaining == best, index, E).amin(-1, keepdim=True)
        picked = index == first
        keep = keep | picked
        remaining = remaining.masked_fill(picked, float("-inf"))
    return keep


def _decode_post(
    x, h, q, keys, values, pos, positions, o_w, attn_scores, mlp_norm, mlp_router, renormalize, *, eps, top_k,
    combine_rule=None, attention_kernel=False, route_in_experts=False,
):  # fmt: skip
    """Attention of one query per row over the cache (B, KV, S, hd) up to `pos`, then the post segment: the
    split-K Triton kernels that read only the filled rows (`attention_kernel`, CUDA), else the same function
    in torch over every row with the later ones masked (dsmoe/model/decode_attention.py)."""
    if attention_kernel:
        y = decode_attention(q, keys, values, pos)
    else:
        y = decode_attention_reference(q, keys, values, pos, positions)  # (B, 1, H x hd)
    return _segment_post(
        x, h, y, o_w, None, mlp_norm, mlp_router, renormalize, attn_scores,
        eps=eps, top_k=top_k, combine_rule=combine_rule, route_in_experts=route_in_experts,
    )  # fmt: skip


@torch.no_grad()
def generate_fast(
    engine: Engine,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`generate` on an Engine (its cache starts empty): the same sampling and stopping, static shapes."""
    engine.reset()
    T = prompt.shape[1]
    total = min(T + max_new_tokens, engine.max_len)
    logits = engine.prefill(prompt)
    return _sample_tokens(
        prompt, logits, engine.decode, total - T, temperature, top_k, top_p, eos_id, generator
    )
