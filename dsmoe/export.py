"""Training checkpoint (any ZeRO stage, any rank count) -> a sparse-inference model directory.

The directory holds:
  config.json        model_type "dsmoe", the model config, and the inference routing per layer type
  model.safetensors  fp32 weights (tied embeddings stored once)
  tokenizer.json     the run's tokenizer: the byte-level BPE it trained or the one data.tokenizer named
                     (+ tokenizer_config.json for AutoTokenizer, with its end-of-document token)

  *.py, modeling_dsmoe.py  the model's code (dsmoe/model and dsmoe/hf.py) as transformers remote code

transformers' AutoModelForCausalLM / AutoTokenizer load the directory with trust_remote_code=True where dsmoe is
not installed (or without it after `import dsmoe.hf`); an encoder's (model_type "dsmoe_encoder") loads with
AutoModelForMaskedLM, and its tokenizer carries the mask and padding tokens (dsmoe.data.mlm).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from safetensors.torch import load_model, save_model

from dsmoe import config as config_lib
from dsmoe import growth
from dsmoe.data.mlm import MASK_TOKEN, PAD_TOKEN, special_ids
from dsmoe.data.tokens import EOS
from dsmoe.model import DecoderLM, EncoderMLM, Routing, build
from dsmoe.remote_code import auto_map, write_remote_code
from dsmoe.train.checkpoint import (
    CheckpointError,
    checkpoint_root,
    consolidated_state_dict,
    resume_tag,
    verify,
)

MODEL_TYPE = "dsmoe"
ENCODER_MODEL_TYPE = "dsmoe_encoder"
MODEL_TYPES = (MODEL_TYPE, ENCODER_MODEL_TYPE)


def load_from_run(
    run_dir: str | Path, tag: str | None = None, trust_pickle: bool = False
) -> tuple[DecoderLM | EncoderMLM, config_lib.Config, Path, int]:
    """The trained model of a run's checkpoint (latest by default): (model, config, tokenizer path, step).
    Reads only safetensors and JSON unless `trust_pickle` (checkpoints saved before 2026-12-02)."""
    root = checkpoint_root(run_dir)
    if tag is None:
        tag = resume_tag(run_dir)  # latest if intact, else the newest intact one (with a warning)
        if tag is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint (nothing in {root})")
    elif problems := verify(root / tag):
        raise CheckpointError(f"{root / tag} is damaged or inconsistent: {'; '.join(problems)}")
    state_dict, ours = consolidated_state_dict(root, tag, trust_pickle)
    if "config" not in ours:
        raise CheckpointError(f"{root / tag} was not written by dsmoe (no config in its client state)")
    cfg = saved_config(ours, root / tag)
    model = build(copy.deepcopy(cfg.model))
    step = int(ours["step"])
    ramping = growth.replay(model, cfg.growth, step, cfg.train.seed) is not None  # the saved shapes
    if cfg.growth.events and not ramping:  # the grown model, described as a plain one
        cfg = copy.deepcopy(cfg)
        cfg.model, cfg.growth = (
            copy.deepcopy(model.cfg),
            config_lib.GrowthConfig(init_std=cfg.growth.init_std),
        )
    if cfg.model.tie_embeddings:
        state_dict.setdefault("lm_head.weight", state_dict["embed.weight"])
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{root / tag}: weights do not fit the saved config: missing {missing}, unexpected {unexpected}"
        )
    return model.eval(), cfg, root / tag / "tokenizer.json", step


def saved_config(ours: dict, checkpoint_dir: Path) -> config_lib.Config:
    """The config of a checkpoint's model. NTNG's layer stacking saved before full depth holds fewer blocks
    than model.n_layers: the depth it had is in its budget state, and the model is described as the plain
    model of that depth (train.method none: stacking's settings do not fit a shallower n_layers)."""
    cfg = config_lib.from_dict(ours["config"], source=f"{checkpoint_dir} (saved config)")
    depth = int((ours.get("budget") or {}).get("depth", cfg.model.n_layers))
    if depth != cfg.model.n_layers:
        cfg = copy.deepcopy(cfg)
        cfg.model.n_layers, cfg.train.method = depth, config_lib.MethodConfig()
    return cfg


def run_config(
    run_dir: str | Path, tag: str | None = None, trust_pickle: bool = False
) -> tuple[config_lib.Config, int]:
    """The config and step of a run's checkpoint (latest intact by default), without loading weights."""
    from dsmoe.train.checkpoint import read_client_state

    tag = tag or resume_tag(run_dir)
    if tag is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint (nothing in {checkpoint_root(run_dir)})")
    ours = read_client_state(checkpoint_root(run_dir) / tag, trust_pickle)
    return saved_config(ours, checkpoint_root(run_dir) / tag), int(ours["step"])


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    routing: Routing,
    tag: str | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Write the sparse-inference model of `run_dir`'s checkpoint to `out_dir`."""
    model, cfg, tokenizer_path, step = load_from_run(run_dir, tag, trust_pickle)
    return write_export(model, cfg, tokenizer_path, out_dir, routing, step)


def write_export(
    model: DecoderLM | EncoderMLM,
    cfg: config_lib.Config,
    tokenizer_path: Path,
    out_dir: str | Path,
    routing: Routing,
    step: int,
) -> Path:
    """Write a model, its config and tokenizer as an exported model directory."""
    if growth.in_progress(model):
        raise CheckpointError(
            f"the checkpoint of step {step} is in the middle of a growth ramp (growth.events): export one "
            "saved after the ramp ends"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    encoder = cfg.model.is_encoder
    if encoder:
        _write_encoder_tokenizer(tokenizer_path, out / "tokenizer.json")
    else:
        (out / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    hf_config = {
        "model_type": ENCODER_MODEL_TYPE if encoder else MODEL_TYPE,
        "architectures": ["DSMoEEncoderForMaskedLM" if encoder else "DSMoEForCausalLM"],
        "vocab_size": cfg.model.vocab_size,
        "hidden_size": cfg.model.d_model,
        "num_hidden_layers": cfg.model.n_layers,
        "max_position_embeddings": cfg.model.max_seq_len,
        "torch_dtype": "float32",
        "routing": routing.to_dict(),
        "auto_map": auto_map(encoder),  # the model's own code beside the weights (dsmoe/remote_code.py)
        "dsmoe": config_lib.to_dict(cfg),
        "trained_steps": step,
        # tells a damaged copy (truncated, altered) from a wrong one (another model's config)
        "weights_sha256": file_sha256(out / "model.safetensors"),
    }
    write_remote_code(out)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": cfg.data.eos_token or EOS,  # resolved when the run started (older runs: ours)
        "model_max_length": cfg.model.max_seq_len,
    }
    if encoder:
        tokenizer_config.update(mask_token=MASK_TOKEN, pad_token=PAD_TOKEN)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def _write_encoder_tokenizer(tokenizer_path: Path, out_path: Path) -> None:
    """The run's tokenizer with the encoder's mask and padding tokens added, at the ids training used."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    n = tok.get_vocab_size()
    tok.add_special_tokens([MASK_TOKEN, PAD_TOKEN])
    if (tok.token_to_id(MASK_TOKEN), tok.token_to_id(PAD_TOKEN)) != special_ids(n):
        raise CheckpointError(
            f"{tokenizer_path}: the mask and padding tokens did not land at {special_ids(n)}"
        )
    tok.save(str(out_path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_export(path: str | Path) -> dict:
    """An export directory's config.json, after checking that its files are there and whole; a problem raises
    CheckpointError with one line naming the file and what is wrong."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not an exported dsmoe model: {config_file} does not exist")
    try:
        meta = json.loads(config_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("model_type") not in MODEL_TYPES:
        found = meta.get("model_type") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{config_file} is the config of another model (model_type {found!r}, not one of {MODEL_TYPES})"
        )
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} does not exist: the export is incomplete")
    weights = path / "model.safetensors"
    recorded = meta.get("weights_sha256")
    if recorded and file_sha256(weights) != recorded:
        raise CheckpointError(
            f"{weights} is damaged: its SHA-256 differs from the one config.json records "
            f"({weights.stat().st_size} bytes; a truncated or altered copy)"
        )
    return meta


def is_export(path: str | Path) -> bool:
    """Whether `path` is an exported dsmoe model directory (a run directory has config.json too)."""
    config_file = Path(path) / "config.json"
    try:
        return config_file.is_file() and json.loads(config_file.read_text()).get("model_type") in MODEL_TYPES
    except (ValueError, AttributeError):
        return False


def load_export(path: str | Path) -> tuple[DecoderLM | EncoderMLM, config_lib.Config, Routing, Path]:
    """An exported model directory: (model, config, its routing rule, tokenizer path)."""
    path = Path(path)
    meta = check_export(path)
    cfg = config_lib.from_dict(meta["dsmoe"], source=str(path / "config.json"))
    model = build(cfg.model)
    try:
        load_model(model, str(path / "model.safetensors"))
    except Exception as e:  # an export from before weights_sha256: safetensors says what it found
        raise CheckpointError(
            f"{path / 'model.safetensors'} cannot be read: {str(e).splitlines()[0][:300]}"
        ) from None
    return model.eval(), cfg, Routing.from_dict(meta["routing"]), path / "tokenizer.json"


def qwen3_moe_incompatibilities(cfg: config_lib.Config) -> list[str]:
    """What keeps a model from being written as a stock transformers Qwen3-MoE (empty: it can be)."""
    m, a = cfg.model, cfg.model.attention
    problems = []
    if m.mlp != "moe" or m.moe.activation != "swiglu":
        problems.append(
            "the MLPs must be DS-MoE layers with SwiGLU experts (model.mlp=moe, model.moe.activation=swiglu)"
        )
    if a.experts:
        problems.append("attention must be plain GQA, not MoA (model.attention.experts=0)")
    if not a.qk_norm:
        problems.append("Qwen3 normalises queries and keys (model.attention.qk_norm=true)")
    return problems


def export_qwen3_moe(
    run_dir: str | Path, out_dir: str | Path, top_k: int, tag: str | None = None, trust_pickle: bool = False
) -> Path:
    """Write the run's model as a stock Qwen3-MoE checkpoint: top-K routing, no renormalisation.

    Qwen3-MoE routes by softmax over all experts and weights the top K by their raw probabilities when
    norm_topk_prob is false: exactly our top-K rule (an SMoE trained with renormalised gates sets it true).
    The stock model is built, given our weights, and saved by transformers itself, so the files are in the
    format every Qwen3-MoE loader reads.
    """
    from transformers import PreTrainedTokenizerFast

    model, cfg, tokenizer_path, _ = load_from_run(run_dir, tag, trust_pickle)
    out = Path(out_dir)
    qwen3_moe_from(model, cfg, top_k).save_pretrained(out)
    PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_path), eos_token=cfg.data.eos_token or EOS
    ).save_pretrained(out)
    return out


def qwen3_moe_from(model: DecoderLM, cfg: config_lib.Config, top_k: int):
    """A stock transformers Qwen3MoeForCausalLM holding a copy of `model`'s weights (fp32, on the CPU), top-K
    routing without renormalisation (see export_qwen3_moe); raises CheckpointError for other architectures."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    problems = qwen3_moe_incompatibilities(cfg)
    if problems:
        raise CheckpointError("cannot export as qwen3_moe: " + "; ".join(problems))
    m, a = cfg.model, cfg.model.attention
    qwen_cfg = Qwen3MoeConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        num_hidden_layers=m.n_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        head_dim=m.head_dim,
        num_experts=m.moe.num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=m.moe.expert_hidden,
        intermediate_size=m.ffn_hidden,
        norm_topk_prob=m.moe.training == "sparse" and m.moe.train_renormalize,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_theta": a.rope_theta, "rope_type": "default"},
        max_position_embeddings=m.max_seq_len,
        tie_word_embeddings=m.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
    )
    qwen = Qwen3MoeForCausalLM(qwen_cfg)
    with torch.no_grad():
        qwen.model.embed_tokens.weight.copy_(model.embed.weight)
        qwen.model.norm.weight.copy_(model.final_norm.weight)
        if not m.tie_embeddings:
            qwen.lm_head.weight.copy_(model.lm_head.weight)
        for ours, theirs in zip(model.blocks, qwen.model.layers, strict=True):
            theirs.input_layernorm.weight.copy_(ours.attn_norm.weight)
            theirs.post_attention_layernorm.weight.copy_(ours.mlp_norm.weight)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
                getattr(theirs.self_attn, name).weight.copy_(getattr(ours.attn, name).weight)
            theirs.mlp.gate.weight.copy_(ours.mlp.router.weight)
            theirs.mlp.experts.gate_up_proj.copy_(ours.mlp.w_in)  # (E, [gate; up], D) in both
            theirs.mlp.experts.down_proj.copy_(
                ours.mlp.w_out.transpose(1, 2)
            )  # ours (E, F, D), theirs (E, D, F)
    return qwen
