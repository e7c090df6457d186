"""The scaling model (genlip_fast.train.scaling): closed forms it must reduce to, and its command line.

That its bytes are the bytes a real run moves is checked in tests/test_hsdp.py (collectives recorded on gloo).
"""

import math

import pytest
import torch

from genlip_fast.model import GenLIP, get_preset
from genlip_fast.train.scaling import (
    PHASES,
    Collective,
    Network,
    Unit,
    calls_in_phase,
    fsdp_units,
    main,
    predict,
    step_collectives,
)


@pytest.fixture(scope="module")
def so16():
    cfg = get_preset("So/16")
    with torch.device("meta"):
        model = GenLIP(cfg)
    total = sum(p.numel() for p in model.parameters())
    last_and_root = total - sum(p.numel() for b in model.blocks[:-1] for p in b.parameters())
    return fsdp_units(cfg), total, total - last_and_root


def test_units_cover_every_parameter_once(so16):
    units, total, _ = so16
    assert sum(u.numel for u in units) == total and len(units) == 28
    assert [u.reshard_after_forward for u in units] == [True] * 26 + [False, False]  # last block, root: gathered


def test_padding_is_per_parameter_dim0():
    u = Unit("x", ((7, 5), (7,), (3,)), True)
    assert u.shard_numel(2) == 4 * 5 + 4 + 2 and u.shard_numel(1) == u.numel == 45
    assert u.shard_numel(4) == 2 * 5 + 2 + 1


def test_ring_bytes():
    assert Collective("all_gather", "shard", 8, 800).bytes_per_gpu == 700
    assert Collective("reduce_scatter", "shard", 4, 400, count=2).bytes_per_gpu == 600
    assert Collective("all_reduce", "replicate", 4, 400).bytes_per_gpu == 600
    assert Collective("all_reduce", "replicate", 1, 400).bytes_per_gpu == 0


def test_fsdp_and_hsdp_bytes_reduce_to_closed_forms(so16):
    """So/16's dims divide by 64, so no padding up to 64 GPUs: per GPU and step, FSDP over n GPUs moves (n-1)/n of bf16
    parameters gathered once (twice for resharded blocks) plus fp32 gradients reduce-scattered once; HSDP moves
    that inside a node and all-reduces the fp32 gradient shard (P/8) across nodes."""
    units, P, P_resharded = so16
    net = Network()
    for nodes in (1, 8, 64):
        fsdp = predict(units, nodes=nodes, net=net, hsdp=False, packs_per_step=547, pack_s=0.1)
        hsdp = predict(units, nodes=nodes, net=net, hsdp=True, packs_per_step=547, pack_s=0.1)
        n = 8 * nodes
        fsdp_bytes = (n - 1) / n * (2 * P + 2 * P_resharded + 4 * P)
        if n <= 64:
            assert math.isclose(fsdp.bytes_nvlink + fsdp.bytes_network, fsdp_bytes, rel_tol=1e-12)
        else:  # 1152 rows over 512 ranks: 3 rows each, a third of it padding, which FSDP2 sends too
            assert fsdp.bytes_network > 1.05 * fsdp_bytes
        assert math.isclose(hsdp.bytes_nvlink, 7 / 8 * (2 * P + 2 * P_resharded + 4 * P), rel_tol=1e-12)
        assert math.isclose(hsdp.bytes_network, 2 * (nodes - 1) / nodes * 4 * P / 8, rel_tol=1e-12)
        assert (fsdp.bytes_network == 0) == (nodes == 1)
        assert math.isclose(hsdp.state_gib * 2**30, 16 * P / 8)
        assert fsdp.state_gib * 2**30 >= 16 * P / n
        assert 0 < hsdp.exposed_s <= hsdp.comm_s and hsdp.efficiency >= fsdp.efficiency
    units_kept = fsdp_units(get_preset("So/16"), reshard_after_forward=False)
    kept = predict(units_kept, nodes=1, net=net, hsdp=False, packs_per_step=8, pack_s=0.1)
    assert math.isclose(kept.bytes_nvlink, 7 / 8 * (2 * P + 4 * P), rel_tol=1e-12)


def test_phases_split_every_call_once(so16):
    units, _, _ = so16
    for R, S in ((1, 8), (4, 8)):
        for unit, colls in step_collectives(units, R, S).items():
            for c in colls:
                assert sum(calls_in_phase(p, unit, c) for p in PHASES) == c.count


def test_step_time_and_overlap():
    """Communication hides behind compute when compute is long, and shows when it is short."""
    units = fsdp_units(get_preset("So/16"))
    net = Network()
    slow = predict(units, nodes=64, net=net, hsdp=False, packs_per_step=512, pack_s=10.0)
    fast = predict(units, nodes=64, net=net, hsdp=False, packs_per_step=512, pack_s=1e-4)
    assert slow.micro_steps == 1 and math.isclose(slow.compute_s, 10.0)
    assert slow.exposed_s < fast.exposed_s and math.isclose(fast.exposed_s, fast.comm_s, rel_tol=0.05)
    assert math.isclose(slow.step_s, slow.compute_s + slow.exposed_s) and slow.efficiency > 0.99
    latency = predict(units, nodes=64, net=Network(step_latency_us=10), hsdp=False, packs_per_step=512, pack_s=1e-4)
    assert latency.comm_s > fast.comm_s


def test_command_line(capsys):
    assert main(["--config", "so16_stage1", "--nodes", "1,8", "--markdown", "--pack-ms", "150"]) == 0
    out = capsys.readouterr().out
    assert "measured 150 ms/pack" in out and "| GPUs | layout | mesh |" in out
    rows = [line for line in out.splitlines() if line.startswith("| 64 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["FSDP", "HSDP"] and "| 8x8 |" in rows[1]
