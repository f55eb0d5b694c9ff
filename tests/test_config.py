"""Config loading: defaults, overrides, and errors that name the key and the file."""

from __future__ import annotations

import pytest

from dsmoe import config as config_lib
from dsmoe.config import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_default_config_loads_and_overrides_apply():
    cfg = config_lib.load(
        None, ["train.max_steps=50", "model.moe.activation=swiglu", "data.val_works=[hamlet]"]
    )
    assert cfg.train.max_steps == 50
    assert cfg.model.moe.activation == "swiglu"
    assert cfg.data.val_works == ["hamlet"]
    assert cfg.model.ffn_hidden == cfg.model.moe.num_experts * cfg.model.moe.expert_hidden


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("model:\n  d_modle: 64\n", "model.d_modle"),
        ("model:\n  moe:\n    experts: 4\n", "model.moe.experts"),
        ("trian:\n  lr: 1.0\n", "trian"),
    ],
)
def test_unknown_key_names_key_and_file(tmp_path, yaml_text, key):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        config_lib.load(path)
    assert key in str(err.value) and str(path) in str(err.value) and "unknown key" in str(err.value)


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("train:\n  lr: fast\n", "train.lr"),
        ("model:\n  n_layers: 2.5\n", "model.n_layers"),
        ("model:\n  mlp: sparse\n", "model.mlp"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, yaml_text, key):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        config_lib.load(path)
    assert key in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.attention.heads=3", "model.attention.heads"),  # MoA has 4 x 1 heads
        ("model.attention.heads_per_expert=3", "model.attention.heads"),  # 12 heads do not divide 128
        ("model.attention.kv_heads=3", "model.attention.kv_heads"),  # 4 heads not divisible by 3 kv heads
        ("data.seq_len=4096", "data.seq_len"),  # longer than max_seq_len
        ("train.micro_batch_size=5", "train.global_batch_size"),
        ("train.eval_top_k=99", "train.eval_top_k"),
        ("parallel.zero_stage=4", "parallel.zero_stage"),
        ("parallel.zero_overlap_comm=true", "parallel.zero_overlap_comm"),  # ZeRO's settings without ZeRO
        ("parallel.zero_stage=1 parallel.zero_bucket_elements=-1", "parallel.zero_bucket_elements"),
        (
            "parallel.zero_stage=1 train.precision=bf16 parallel.zero_fp32_grad_accumulation=true",
            "parallel.zero_fp32_grad_accumulation",
        ),  # ZeRO-2 only
        (
            "parallel.zero_stage=2 parallel.zero_fp32_grad_accumulation=true",
            "parallel.zero_fp32_grad_accumulation",
        ),
        ("model.moe.num_experts=0", "model.moe.num_experts"),
        # Layouts: what tensor and expert parallelism split must divide evenly (tiny: 4 MoA heads, 2 KV
        # heads, 8 experts x 64).
        ("parallel.tp=4 model.attention.kv_heads=2", "model.attention.kv_heads"),
        ("parallel.tp=8", "model.attention.heads"),
        ("parallel.ep=3", "model.moe.num_experts"),
        ("parallel.ep=2 parallel.zero_stage=3", "parallel.zero_stage"),
        ("parallel.tp=2 model.moe.expert_hidden=63", "model.moe.expert_hidden"),
        ("parallel.ep=2 model.mlp=dense", "parallel.ep"),
        ("parallel.expert_dispatch=both", "parallel.expert_dispatch"),
        ("model.moe.training=sparse parallel.ep=2", "model.moe.training"),
        ("model.moe.training=sparse model.moe.train_top_k=9", "model.moe.train_top_k"),
    ],
)
def test_impossible_combination_names_key_and_file(override, key):
    with pytest.raises(ConfigError) as err:
        config_lib.load(None, override.split())
    assert key in str(err.value) and "tiny.yaml" in str(err.value)


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match="train.nope"):
        config_lib.load(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        config_lib.load(None, ["train.max_steps"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config_lib.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        config_lib.load(write(tmp_path, "- a\n- b\n"))


def test_round_trip_through_dict():
    cfg = config_lib.load(
        None, ["model.d_model=96", "model.attention.experts=3", "model.attention.heads_per_expert=2"]
    )
    again = config_lib.from_dict(config_lib.to_dict(cfg), source="test")
    assert again == cfg


def test_checkpoint_every_zero_needs_no_export():
    assert (
        config_lib.load(
            None, ["train.checkpoint_every=0", "train.export_at_end=false"]
        ).train.checkpoint_every
        == 0
    )
    with pytest.raises(ConfigError, match="nothing to export"):
        config_lib.load(None, ["train.checkpoint_every=0"])


def test_expert_dispatch_takes_the_path_that_moves_less():
    """parallel/README.md: tokens move 4(ep-1)TD, weights 3(ep-1)/ep W; DS-MoE-1B's crossover at ep 2 is
    T = 3W / (4 ep D) = 6144 tokens per rank."""
    from parallel.expert import choose_dispatch
    from parallel.groups import ParallelDims

    dims = ParallelDims(world_size=2, rank=0, local_rank=0, dp=1, ep=2, tp=1, device=None)
    d, w = 2048, 2 * 32 * 256 * 2048  # DS-MoE-1B: GeLU experts, w_in + w_out
    assert choose_dispatch("auto", 4096, d, w, dims) == "tokens"
    assert choose_dispatch("auto", 8192, d, w, dims) == "weights"
    assert choose_dispatch("tokens", 8192, d, w, dims) == "tokens"
    one = ParallelDims(world_size=1, rank=0, local_rank=0, dp=1, ep=1, tp=1, device=None)
    assert choose_dispatch("weights", 8192, d, w, one) == "tokens"  # nothing to gather without ep


def test_a_batch_the_layout_cannot_split_names_the_keys():
    from dsmoe.train.engine import gradient_accumulation_steps
    from parallel.groups import ParallelDims

    cfg = config_lib.load(None, ["train.global_batch_size=16", "train.micro_batch_size=16"])
    dims = ParallelDims(world_size=4, rank=0, local_rank=0, dp=1, ep=2, tp=2, device=None)
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(16\).*dp x ep = 1 x 2"):
        gradient_accumulation_steps(cfg, dims)
    cfg.train.micro_batch_size = 8
    assert gradient_accumulation_steps(cfg, dims) == 1


def test_identity_keeps_every_set_value_and_drops_off_defaults():
    """Research tools reuse runs with the same identity: any set value must change it, an option left at an
    off default must not appear (so adding such an option keeps earlier runs valid)."""
    base = config_lib.load(None, [])
    key = config_lib.identity(base)
    assert '"growth"' not in key and '"head_dim"' not in key
    # options a run does not read: no budget, method none, Sophia's settings under AdamW
    assert not any(word in key for word in ('"budget"', '"method"', "sophia", "optimizer", "geglu"))
    assert config_lib.identity(config_lib.load(None, [])) == key
    for override in [
        "train.lr=0.0005",
        "model.attention.head_dim=16",
        "model.moe.alpha=0.0",
        "train.optimizer=lion",
    ]:
        assert config_lib.identity(config_lib.load(None, [override])) != key, override
    grown = config_lib.load(None, [])
    grown.growth.events = [config_lib.GrowthEvent(step=2, dim="ffn", size=64, ramp_steps=2)]
    assert '"growth"' in config_lib.identity(grown)
    budgeted = config_lib.load(None, [])
    budgeted.train.budget.rst_hours = 0.01
    budgeted.train.method.name = "layer_drop"
    assert '"budget"' in config_lib.identity(budgeted) and '"layer_drop"' in config_lib.identity(budgeted)


def test_activation_checkpointing_is_refused_for_the_encoder():
    config_lib.load(None, ["train.activation_checkpointing=true"])  # the decoder takes it
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        config_lib.load("configs/tiny_mlm.yaml", ["train.activation_checkpointing=true"])


def test_zero_settings_reach_deepspeed_and_unset_ones_keep_its_defaults():
    from dsmoe.train.engine import zero_config

    tuned = [
        "parallel.zero_stage=2",
        "parallel.zero_bucket_elements=20000000",
        "parallel.zero_overlap_comm=true",
    ]
    assert zero_config(config_lib.load(None, tuned).parallel) == {
        "stage": 2,
        "reduce_bucket_size": 20_000_000,
        "allgather_bucket_size": 20_000_000,
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    assert zero_config(config_lib.load(None, ["parallel.zero_stage=3"]).parallel) == {
        "stage": 3,
        "contiguous_gradients": True,
    }  # overlap_comm left to DeepSpeed (on at stage 3)
    assert zero_config(config_lib.load(None).parallel) == {"stage": 0}


def test_fp32_gradient_accumulation_reaches_deepspeed_only_when_asked():
    from dsmoe.train.engine import deepspeed_config
    from parallel.groups import ParallelDims

    bf16_zero2 = ["parallel.zero_stage=2", "train.precision=bf16"]
    dims = ParallelDims(world_size=1, rank=0, local_rank=0, dp=1, ep=1, tp=1, device=None)
    plain = deepspeed_config(config_lib.load(None, bf16_zero2), dims)
    assert "data_types" not in plain  # DeepSpeed's default: the model's dtype
    cfg = config_lib.load(None, [*bf16_zero2, "parallel.zero_fp32_grad_accumulation=true"])
    assert deepspeed_config(cfg, dims)["data_types"] == {"grad_accum_dtype": "fp32"}
