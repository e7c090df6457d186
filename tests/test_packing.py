"""The packed batch and the packer (foundation)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genlip_fast.data import IGNORE_INDEX, Packer, Sample, SampleTooLongError, pack_samples
from genlip_fast.data.packing import _tightest_bin_py, fit_sample, tightest_bin
from genlip_fast.data.transforms import decode_resize_crop, patchify

PD = 12  # patch dim used in these tests


def sample(h, w, caption, prompt=(), key="s"):
    return Sample(torch.randn(h * w, PD), (h, w), torch.tensor(caption, dtype=torch.int64),
                  torch.tensor(prompt, dtype=torch.int64), key=key)


def test_fields_of_a_small_pack_with_prompt_text_only_and_padding():
    a = sample(2, 2, [11, 12, 2], prompt=[7, 8])  # 4 patches, 2 prompt, 3 caption = 9
    b = sample(0, 0, [21, 22, 2])  # text-only = 3
    p = pack_samples([a, b], pad_to=16)
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 9, 12]
    assert p.prefix_lens.tolist() == [4, 0]
    assert p.num_tokens == 16 and p.max_seqlen == 9
    assert p.image_index.tolist() == [0, 1, 2, 3]
    assert p.text_index.tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert p.input_ids.tolist() == [0, 0, 0, 0, 7, 8, 11, 12, 2, 21, 22, 2, 0, 0, 0, 0]
    X = IGNORE_INDEX
    # the last prompt token predicts caption[0]; image and prompt positions carry no loss; the text-only sample's
    # first caption token has nothing before it; padding carries nothing
    assert p.targets.tolist() == [X, X, X, X, X, 11, 12, 2, X, 22, 2, X, X, X, X, X]
    assert p.loss_index.tolist() == [5, 6, 7, 9, 10]
    assert p.seq_ids.tolist() == [0] * 9 + [1] * 3 + [-1] * 4
    assert p.position_ids[:, 12:].abs().sum() == 0
    assert torch.equal(p.patches, a.patches)


def test_last_image_token_predicts_first_caption_token():
    p = pack_samples([sample(1, 3, [5, 6, 2])])
    assert p.targets.tolist() == [X := IGNORE_INDEX, X, 5, 6, 2, X]


def test_clear_errors():
    with pytest.raises(ValueError, match="0 samples"):
        pack_samples([])
    with pytest.raises(ValueError, match="0 tokens"):
        pack_samples([sample(1, 1, [])])
    with pytest.raises(SampleTooLongError, match="never split"):
        pack_samples([sample(4, 4, [1] * 10, key="big")], max_tokens=20)
    with pytest.raises(SampleTooLongError, match="never split"):
        Packer(20).add(sample(4, 4, [1] * 10))
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        from PIL import Image
        import io

        buf = io.BytesIO()
        Image.new("RGB", (12, 40)).save(buf, format="PNG")
        decode_resize_crop(buf.getvalue(), 64)
    with pytest.raises(ValueError, match="unreadable image"):
        decode_resize_crop(b"not an image", 64)
    with pytest.raises(ValueError, match="do not match grid"):
        Sample(torch.randn(5, PD), (2, 2), torch.tensor([1]))


def test_truncate_option_cuts_the_caption_only():
    s = sample(3, 3, list(range(30)))
    t = fit_sample(s, 20, truncate=True)
    assert len(t) == 20 and t.caption_ids.tolist() == list(range(11))
    with pytest.raises(SampleTooLongError, match="even its image"):
        fit_sample(sample(5, 5, [1]), 20, truncate=True)


def test_patchify_order_matches_conv():
    img = torch.randn(3, 32, 48)
    conv = torch.nn.Conv2d(3, 8, 16, stride=16)
    ref = conv(img[None])[0].flatten(1).t()  # (6, 8), row-major grid
    got = torch.nn.functional.linear(patchify(img, 16), conv.weight.flatten(1), conv.bias)
    assert torch.allclose(got, ref, atol=1e-5)


lengths = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(1, 20)), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(lengths, st.sampled_from([1, 4, 16]), st.integers(40, 80))
def test_packer_keeps_every_sample_whole_and_once(layout, lookahead, cap):
    samples = [sample(h, w, list(range(1, n + 1)), key=str(i)) for i, (h, w, n) in enumerate(layout)]
    samples = [s for s in samples if len(s) <= cap]
    packer = Packer(cap, lookahead=lookahead)
    packs = list(packer.pack(samples))
    keys = [k for p in packs for k in p.keys]
    assert sorted(keys, key=int) == [s.key for s in samples]
    for p in packs:
        assert int(p.cu_seqlens[-1]) <= cap
    if packs:
        assert 0 < packer.fill_ratio <= 1


@pytest.mark.parametrize("impl", [tightest_bin, _tightest_bin_py])
def test_tightest_bin_picks_the_least_room_that_fits(impl):
    assert impl([6, 9, 8, 8], 2, 10) == 2  # rooms 4, 1, 2, 2: the first of the two 2s
    assert impl([6, 9], 5, 10) == -1
    assert impl([], 1, 10) == -1


def test_compiled_helper_is_built_where_a_compiler_is():
    import shutil

    if shutil.which("c++") or shutil.which("g++"):
        assert tightest_bin is not _tightest_bin_py, "setup.py should have built genlip_fast._csrc"


def reference_pack(samples, pad_to=None):
    """The pack laid out one sample at a time, the plain way (what pack_samples did before it worked on whole
    packs): positions from sample_position_ids, one slice per field and sample."""
    from genlip_fast.ops.mrope.positions import sample_position_ids

    lens = torch.tensor([len(s) for s in samples])
    T = pad_to or int(lens.sum())
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    pos, ids = torch.zeros(3, T, dtype=torch.int64), torch.zeros(T, dtype=torch.int64)
    targets, seq = torch.full((T,), IGNORE_INDEX, dtype=torch.int64), torch.full((T,), -1, dtype=torch.int32)
    image_index, text_index = [], []
    for i, s in enumerate(samples):
        a, P, Lp, Lc = int(cu[i]), s.num_patches, s.prompt_ids.numel(), s.caption_ids.numel()
        pos[:, a:a + len(s)] = sample_position_ids(*s.grid_hw, Lp + Lc)
        ids[a + P:a + len(s)] = torch.cat([s.prompt_ids, s.caption_ids])
        first = a + P + Lp
        lo = max(first - 1, a)
        targets[lo:first + Lc - 1] = s.caption_ids[lo - (first - 1):]
        seq[a:a + len(s)] = i
        image_index.append(torch.arange(a, a + P))
        text_index.append(torch.arange(a + P, a + len(s)))
    return dict(cu_seqlens=cu, position_ids=pos, input_ids=ids, targets=targets, seq_ids=seq,
                image_index=torch.cat(image_index), text_index=torch.cat(text_index),
                loss_index=(targets != IGNORE_INDEX).nonzero().flatten(),
                prefix_lens=torch.tensor([s.num_patches for s in samples], dtype=torch.int32))


layouts = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 4), st.integers(1, 9)),
                   min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(layouts, st.integers(0, 7))
def test_pack_samples_matches_the_per_sample_reference(layout, pad):
    samples = [sample(h, w, list(range(100 * i + 1, 100 * i + 1 + c)), prompt=[7] * p, key=str(i))
               for i, (h, w, p, c) in enumerate(layout)]
    total = sum(len(s) for s in samples)
    got = pack_samples(samples, pad_to=total + pad if pad else None, max_tokens=None)
    for name, want in reference_pack(samples, total + pad if pad else None).items():
        assert torch.equal(getattr(got, name), want), name
    assert got.max_seqlen == max(len(s) for s in samples) and got.keys == [s.key for s in samples]
    with_image = any(s.num_patches for s in samples)  # text only: no patch width to speak of
    assert torch.equal(got.patches, torch.cat([s.patches for s in samples]) if with_image else torch.zeros(0, 0))
    assert got.grid_hw.tolist() == [list(s.grid_hw) for s in samples]
