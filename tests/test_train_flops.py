"""The FLOP counter behind MFU agrees with a count by hand."""

import torch

from genlip_fast.data.batch import Sample
from genlip_fast.data.packing import pack_samples
from genlip_fast.model import get_preset
from genlip_fast.train.flops import pack_flops, peak_flops, prefix_lm_pairs, training_flops


def test_prefix_lm_pairs_match_the_mask():
    for p, t in [(16, 5), (4, 3), (0, 7), (9, 0), (1, 1)]:
        n = p + t
        brute = sum(1 for i in range(n) for j in range(n) if j < p or (i >= p and j <= i))
        assert prefix_lm_pairs(p, t) == brute


def test_hand_count_on_a_small_pack():
    # tiny: d 128, 4 heads of 32, FFN 352, 4 layers, elementwise gate (q_proj is 2 x 128 wide), patch 16x16x3.
    V = 200
    cfg = get_preset("tiny", vocab_size=V)
    # two samples: 16 image + 5 caption tokens, 4 image + 3 caption tokens; loss on the 8 caption tokens
    linear_weights = 128 * 256 + 128 * 128 + 128 * 128 + 128 * 128 + 3 * 128 * 352  # q+gate, k, v, o, SwiGLU
    assert linear_weights == 217088
    tokens = 21 + 7
    pairs = (16 * 16 + 5 * 16 + 15) + (4 * 4 + 3 * 4 + 6)  # image block + text->image + causal text
    assert pairs == 385
    fwd = 2 * linear_weights * tokens * 4 + 4 * (4 * 32) * pairs * 4 + 2 * 128 * V * 8
    patch = 2 * 768 * 128 * 20  # forward; backward only needs the weight gradient
    by_hand = 3 * fwd + 2 * patch
    assert training_flops(cfg, [21, 7], [16, 4], 8) == by_hand

    samples = [
        Sample(torch.randn(16, 768), (4, 4), torch.randint(0, V, (5,))),
        Sample(torch.randn(4, 768), (2, 2), torch.randint(0, V, (3,))),
    ]
    batch = pack_samples(samples, max_tokens=64)
    assert batch.num_loss_tokens == 8
    assert pack_flops(cfg, batch) == by_hand  # padding does not count


def test_text_projection_and_headwise_gate():
    cfg = get_preset("tiny-textproj", vocab_size=100)  # d 96, 2 heads of 48, text dim 64, headwise gate
    lw = 96 * (96 + 2) + 3 * 96 * 96 + 3 * 96 * 192
    fwd = 2 * lw * 10 * 2 + 4 * 96 * prefix_lm_pairs(4, 6) * 2 + 2 * 64 * 96 * (6 + 6) + 2 * 64 * 100 * 6
    assert training_flops(cfg, [10], [4], 6) == 3 * fwd + 2 * (2 * 768 * 96 * 4)


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("some cpu") is None and peak_flops(None) is None


def test_peak_table_matches_the_most_specific_name_first():
    assert peak_flops("NVIDIA GB200") == 2500e12 and peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("NVIDIA GH200 480GB") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    fragments = [f for f, _ in __import__("genlip_fast.train.flops", fromlist=["x"]).PEAK_BF16_FLOPS]
    for i, a in enumerate(fragments):  # a fragment never hides a later, longer one that contains it
        assert not any(a.lower() in b.lower() for b in fragments[i + 1:]), a
