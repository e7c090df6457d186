"""KV-cache captioning (genlip_fast.speak.generate) against the recompute oracle (GenLIP.generate), and sampling."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genlip_fast.data import Sample, pack_samples
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.speak import Sampling, generate, sample_next, top_p_filter

GRIDS = [(2, 3), (1, 1), (4, 2), (3, 3), (1, 5)]


def tiny_model(preset, seed=0):
    torch.manual_seed(seed)
    cfg = get_preset(preset, attn_backend="reference", ce_backend="reference")
    return GenLIP(cfg).eval()


def images(cfg, grids, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(h * w, cfg.patch_dim, generator=g) for h, w in grids]


def teacher_forced_logits(model, patches, grids, prompt, captions):
    """The recompute path's logits at every step, from one forward: position i's logits depend only on tokens <= i,
    so ``[image | prompt | caption]`` read at the caption's loss positions gives each step's logits."""
    samples = [Sample(p, g, torch.tensor(c), torch.tensor(prompt, dtype=torch.int64))
               for p, g, c in zip(patches, grids, captions)]
    pack = pack_samples(samples)
    rows = model.logits_at(pack, pack.loss_index)
    return list(rows.split([len(c) for c in captions]))


@pytest.mark.parametrize("preset", ["tiny", "tiny-textproj", "tiny-hd72"])
@pytest.mark.parametrize("prompt", [[], [5, 9, 11]])
def test_greedy_kv_cache_equals_recompute(preset, prompt):
    model = tiny_model(preset)
    patches = images(model.cfg, GRIDS)
    prompt_t = torch.tensor(prompt, dtype=torch.int64) if prompt else None
    # A stop token that the oracle really produces mid-caption, so samples leave the batch at different steps.
    free = model.generate(patches, GRIDS, eot_id=-1, max_new_tokens=10, prompt_ids=prompt_t)
    stop = free[1][2]
    want = model.generate(patches, GRIDS, eot_id=stop, max_new_tokens=10, prompt_ids=prompt_t)
    got, logits = generate(model, patches, GRIDS, stop_ids={stop}, prompt_ids=prompt, max_new_tokens=10,
                           return_logits=True)
    assert got == want
    lengths = [len(c) for c in got]
    assert min(lengths) < 10 == max(lengths), lengths  # some stopped early, some ran to the limit
    for mine, ref in zip(logits, teacher_forced_logits(model, patches, GRIDS, prompt, got)):
        torch.testing.assert_close(mine, ref, atol=2e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grids=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=6),
       prompt=st.lists(st.integers(3, 500), max_size=4), new=st.integers(1, 7))
def test_kv_cache_logits_match_recompute_on_drawn_layouts(grids, prompt, new):
    model = tiny_model("tiny")
    patches = images(model.cfg, grids)
    got, logits = generate(model, patches, grids, stop_ids=(), prompt_ids=prompt, max_new_tokens=new,
                           return_logits=True)
    assert [len(c) for c in got] == [new] * len(grids)
    for mine, ref in zip(logits, teacher_forced_logits(model, patches, grids, prompt, got)):
        torch.testing.assert_close(mine, ref, atol=2e-5, rtol=1e-5)


def test_sampling_is_reproducible_for_a_seed():
    model = tiny_model("tiny")
    patches = images(model.cfg, GRIDS)
    run = lambda seed: generate(model, patches, GRIDS, stop_ids=(), max_new_tokens=8,  # noqa: E731
                                sampling=Sampling(temperature=1.5, top_p=0.9, seed=seed))
    a, b, c = run(3), run(3), run(4)
    assert a == b
    assert a != c
    greedy = generate(model, patches, GRIDS, stop_ids=(), max_new_tokens=8)
    assert a != greedy  # temperature 1.5 on a random model does not collapse to the argmax


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]])
    kept = top_p_filter(probs, 0.75)
    # row 0: 0.5 then 0.3 reach 0.8 >= 0.75, so 0.15 and 0.05 go; row 1: three of four quarters reach 0.75
    torch.testing.assert_close(kept[0], torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    assert (kept[1] > 0).sum() == 3 and torch.allclose(kept[1].sum(), torch.tensor(1.0))
    torch.testing.assert_close(top_p_filter(probs, 0.8)[0], kept[0])  # mass exactly 0.8 is enough
    assert (top_p_filter(probs, 0.81)[0] > 0).sum() == 3
    assert (top_p_filter(probs, 0.01)[0] > 0).tolist() == [False, True, False, False]  # the top token always stays
    # sampling draws only from the nucleus, in proportion
    logits = probs[:1].log().expand(20000, -1)
    draws = sample_next(logits, Sampling(temperature=1.0, top_p=0.75), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.625) < 0.02 and abs(counts[3] - 0.375) < 0.02


def test_sampling_options_are_checked():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
