"""The attention variant registry and the host-side pieces the variants add: how a variant is chosen (and that the
backward follows its forward), the flat tile list, the head layouts and the stride-alignment hint.

That every variant computes the right attention is tested in test_prefix_lm_attention.py (parametrised over them).
"""

import pytest
import torch

from genlip_fast.ops.prefix_lm_attention import function as F
from genlip_fast.ops.prefix_lm_attention import launch as L
from genlip_fast.ops.prefix_lm_attention import prefix_lm_attention
from genlip_fast.ops.prefix_lm_attention.variants import (
    ENV_VAR,
    VARIANTS,
    Variant,
    current_variant,
    parse_variant,
    use_variant,
)


def test_names_parse_combine_and_come_out_canonical():
    for name in VARIANTS:
        canonical = parse_variant(name).name
        assert canonical == name or (name, canonical) == ("onepass", "rope_once+onepass")
        assert parse_variant(canonical).name == canonical
    assert parse_variant("rope_once+hd80") == Variant(hd80=True, rope_once=True)
    assert parse_variant("tile_list+hd80").name == "hd80+tile_list"
    # the one-pass backward runs on pre-rotated q/k (rotation in the tile spills registers there)
    assert parse_variant("onepass+hd80").name == "hd80+rope_once+onepass"
    assert parse_variant("default") == Variant()
    with pytest.raises(ValueError, match=r"unknown attention variant \['hd96'\].*tile_list"):
        parse_variant("hd80+hd96")


def test_context_manager_over_environment_over_default(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert current_variant() == "default"
    monkeypatch.setenv(ENV_VAR, "tile_list+hd80")
    assert current_variant() == "hd80+tile_list"
    with use_variant("fit_tiles"):
        assert current_variant() == "fit_tiles"
        with use_variant("default"):
            assert current_variant() == "default"
        assert current_variant() == "fit_tiles"
    assert current_variant() == "hd80+tile_list"
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=ENV_VAR):
        current_variant()
    with pytest.raises(ValueError, match="unknown"), use_variant("nope"):
        pass


def _pack(T=20, H=1, D=24):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, H, D, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 12, 18], dtype=torch.int32)
    pl = torch.tensor([8, 2], dtype=torch.int32)
    pos = torch.zeros(3, T, dtype=torch.int64)
    return q, k, v, cu, pl, pos


def test_variant_read_at_call_and_kept_by_its_backward(monkeypatch):
    launched = []
    real_run = F._run
    monkeypatch.setattr(F, "_run", lambda launch: (launched.append((launch.name, launch.consts)), real_run(launch)))
    q, k, v, cu, pl, pos = _pack()
    monkeypatch.setenv(ENV_VAR, "tile_list")
    with use_variant("hd80+onepass"):
        out = prefix_lm_attention(q, k, v, cu, pl, position_ids=pos, mrope_section=[4, 4, 4], max_seqlen=12,
                                  impl="triton")
    # The backward runs outside the block and with another variant in the environment: it follows its forward.
    out.sum().backward()
    names = [n for n, _ in launched]
    # onepass implies rope_once: q and k rotated once, dq (from the fp32 sum) and dk un-rotated once
    assert names == ["rope", "rope", "fwd", "pre", "onepass", "rope", "rope"], names
    assert all(c["SPLIT"] and not c["TILE_LIST"] for n, c in launched if n in ("fwd", "onepass"))
    launched.clear()
    prefix_lm_attention(q, k, v, cu, pl, max_seqlen=12, impl="triton")  # no rope: the environment's tile_list
    assert launched[0][1]["TILE_LIST"] and not launched[0][1]["SPLIT"]


def _tiles(lens, block, descending, T=None):
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1]) + 3 if T is None else T
    tiles, cap = L._tile_list(cu, T, (block,), descending)
    row = tiles[0].tolist()
    total, samples, blocks = row[0], row[1:1 + cap], row[1 + cap:]
    return total, samples, blocks, cap


@pytest.mark.parametrize("descending", [True, False])
def test_tile_list_holds_every_real_tile_once_longest_sample_first(descending):
    lens = [5, 40, 0, 17, 33, 16]
    block = 16
    total, samples, blocks, cap = _tiles(lens, block, descending)
    expect = {(s, b) for s, n in enumerate(lens) for b in range(-(-n // block))}
    real = list(zip(samples[:total], blocks[:total]))
    assert total == len(expect) and set(real) == expect and len(real) == len(expect)
    # samples longest first; inside a sample blocks last-to-first (query side) or first-to-last (key side)
    order = [s for i, (s, _) in enumerate(real) if i == 0 or real[i - 1][0] != s]
    assert order == sorted(order, key=lambda s: -lens[s])
    for s in order:
        mine = [b for t, b in real if t == s]
        assert mine == sorted(mine, reverse=descending)
    # the rest are padding programs, numbered 0, 1, ...; at least one, since the grid is cdiv(T, block) + n + 1
    assert cap == -(-(sum(lens) + 3) // block) + len(lens) + 1
    assert samples[total:] == [len(lens)] * (cap - total) and blocks[total:] == list(range(cap - total))


def test_tile_list_of_empty_packs_and_the_cache():
    total, samples, blocks, cap = _tiles([], 32, True, T=7)
    assert total == 0 and samples == [0] * cap and blocks == list(range(cap))
    total, samples, _, cap = _tiles([0, 0], 32, False, T=5)
    assert total == 0 and samples == [2] * cap
    cu = torch.tensor([0, 9], dtype=torch.int32)
    a, _ = L._tile_list(cu, 9, (16, 32), True)
    assert L._tile_list(cu, 9, (16, 32), True)[0] is a  # same pack: built once
    cu[1] = 8  # an in-place change bumps the version: rebuilt
    assert L._tile_list(cu, 9, (16, 32), True)[0] is not a
    assert a.shape == (2, 1 + 2 * (1 + 1 + 1))


def test_head_layouts():
    assert F._layout(72, False, True) == dict(SPLIT=False, QK_A=64, QK_B=64, V_A=128, V_B=16)
    # 72 = 64 + 8: v/dO as 64 + 16; q/k with in-tile rope as (32 + 32) + (4 + 4 padded to 8 + 8), without as v
    assert F._layout(72, True, True) == dict(SPLIT=True, QK_A=64, QK_B=16, V_A=64, V_B=16)
    assert F._layout(72, True, False) == dict(SPLIT=True, QK_A=64, QK_B=16, V_A=64, V_B=16)
    assert F._layout(40, True, True) == dict(SPLIT=True, QK_A=32, QK_B=16, V_A=32, V_B=16)
    assert F._layout(48, True, False) == dict(SPLIT=True, QK_A=32, QK_B=16, V_A=32, V_B=16)
    # powers of two are unpadded already, and a rest wider than 16 (96 = 64 + 32) is left alone too
    for d in (64, 128, 96):
        assert F._layout(d, True, True) == F._layout(d, False, True)


def test_alignment_hint_is_what_every_stride_allows():
    x = torch.empty(10, 16, 72)
    assert F._align(x) == 8
    assert F._align(torch.empty(10, 3, 144)[..., :72], x) == 8
    assert F._align(torch.empty(10, 2, 36), x) == 4
    assert F._align(torch.empty(10, 3, 71)[..., :70]) == 1


def test_gpu_configs_are_built_once_so_the_autotuner_is_reused(monkeypatch):
    # The autotuner is cached per config tuple and triton.Config compares by identity: a fresh tuple per call
    # would re-tune every call on the GPU.
    monkeypatch.setattr(L, "interpreting", lambda: False)
    for variant in (Variant(), Variant(fit_tiles=True, tile_list=True)):
        for cls in L.GPU_CONFIGS:
            a, blocks = L._configs("fwd", False, variant, cls)
            assert L._configs("fwd", False, variant, cls)[0] is a
            assert [c.kwargs["TILE_ROW"] for c in a] == [blocks.index(c.kwargs["BLOCK_M"]) for c in a]
    assert (len(L._configs("dkdv", False, Variant(fit_tiles=True), "w128")[0])
            > len(L._configs("dkdv", False, Variant(), "w128")[0]))


def test_config_table_follows_the_head_layout():
    def cls(d, split, rope):
        return L.layout_class(dict(F._layout(d, split, rope), ROPE=rope))

    assert cls(64, False, True) == cls(64, True, True) == "w64"  # powers of two: hd80 changes nothing
    assert cls(72, False, True) == cls(128, False, False) == "w128"
    assert cls(72, True, True) == cls(80, True, True) == "split_rope"
    assert cls(72, True, False) == "split"
    assert set(L.GPU_CONFIGS) == set(L.GPU_CONFIGS_FIT) == {"w64", "w128", "split", "split_rope"}


def test_grouped_query_attention_drops_the_configs_that_spill_with_it():
    # GQA_DROP's entries (measured with ptxas for sm_90) leave grouped launches and only them.
    mha, gqa = L.gpu_table("dkdv", False, Variant(), "w128"), L.gpu_table("dkdv", False, Variant(), "w128", True)
    assert (32, 64, 8, 2) in mha and (32, 64, 8, 2) not in gqa and (32, 64, 8, 3) in gqa
    assert (32, 64, 8, 3) not in L.gpu_table("dkdv", False, Variant(tile_list=True), "w128", True)
    assert L.gpu_table("dq", False, Variant(), "w128", True) == L.gpu_table("dq", False, Variant(), "w128")
    for cls, kernels in L.GQA_DROP.items():  # every grouped launch keeps candidates
        for name in kernels:
            for variant in (Variant(), Variant(tile_list=True), Variant(fit_tiles=True, tile_list=True)):
                assert L.gpu_table(name, False, variant, cls, True), (cls, name, variant)
