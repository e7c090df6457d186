"""The FlexAttention baseline used by the benchmarks computes the same attention (forward; FlexAttention has no
backward on CPU), and the model's ``attn_backend="flex"`` path builds one block mask per pack."""

import torch

from genlip_fast.ops import prefix_lm_attention
from genlip_fast.ops.prefix_lm_attention import flex


def test_flex_forward_matches_reference_and_reuses_the_pack_mask():
    torch.manual_seed(0)
    # samples: 3 image + 2 text, image-only, text-only, then padding
    cu = torch.tensor([0, 5, 7, 10], dtype=torch.int32)
    prefix = torch.tensor([3, 2, 0], dtype=torch.int32)
    q, k, v, gate = (torch.randn(12, 2, 8) for _ in range(4))
    pos = torch.randint(0, 6, (3, 12))
    kw = dict(gate=gate, position_ids=pos, mrope_section=(2, 1, 1))
    with torch.no_grad():
        out = prefix_lm_attention(q, k, v, cu, prefix, impl="flex", **kw)
        mask = flex._MASK_CACHE[0][-1]
        prefix_lm_attention(q, k, v, cu, prefix, impl="flex", **kw)
        assert flex._MASK_CACHE[0][-1] is mask  # same pack: no rebuild
        ref = prefix_lm_attention(q, k, v, cu, prefix, impl="reference", **kw)
    torch.testing.assert_close(out[:10], ref[:10], atol=1e-5, rtol=1e-5)
    assert out[10:].abs().max() == 0


def test_flex_grouped_query_attention_matches_reference():
    torch.manual_seed(1)
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    prefix = torch.tensor([3, 0], dtype=torch.int32)
    q, gate = torch.randn(9, 4, 8), torch.randn(9, 4)
    k, v = torch.randn(9, 2, 8), torch.randn(9, 2, 8)  # two query heads per key/value head
    kw = dict(gate=gate, position_ids=torch.randint(0, 6, (3, 9)), mrope_section=(2, 1, 1))
    with torch.no_grad():
        out = prefix_lm_attention(q, k, v, cu, prefix, impl="flex", **kw)
        ref = prefix_lm_attention(q, k, v, cu, prefix, impl="reference", **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
