"""Captioning metrics on hand-checked examples, the linear probe's classifier against a plain reference, probe
features against encoding one image at a time, and the ImageFolder reader's errors (issue 17)."""

import math

import pytest
import torch
import torch.nn.functional as F

from genlip_fast.data.synthetic import SHAPES, generate_probe_set
from genlip_fast.eval import ImageFolder, caption_metrics, encoder_features, fit_linear_probe, linear_probe, normalize
from genlip_fast.speak import ImageTransform


def test_normalize_drops_case_and_punctuation():
    assert normalize("A red circle in the Center.") == normalize("a red circle in the center .") == \
        ["a", "red", "circle", "in", "the", "center"]


def test_bleu4_by_hand():
    # 7 words each, the last differs: 1..4-gram precisions 6/7, 5/6, 4/5, 3/4, equal lengths (no brevity penalty)
    got = caption_metrics(["a red circle in the top left"], ["a red circle in the top right."])
    assert got["bleu4"] == pytest.approx((6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25, rel=1e-8)
    assert got["exact_match"] == 0.0
    assert caption_metrics(["a red circle in the top left ."], ["A red circle in the top left"])["bleu4"] == \
        pytest.approx(1.0)
    # brevity penalty: a 5-word prefix of a 7-word reference has precision 1 and BP = exp(1 - 7/5)
    got = caption_metrics(["a red circle in the top left"], ["a red circle in the"])["bleu4"]
    assert got == pytest.approx(math.exp(1 - 7 / 5), rel=1e-8)


def test_cider_by_hand():
    # Two images, one reference each. IDF over the 2 references: "a" is in both (weight log 2 - log 2 = 0), every
    # other n-gram in one (or none, for n-grams no reference has) gets log 2. Image 1 is exact: cosine 1 for n = 1..3
    # and no 4-grams (0): 10 * 3/4 = 7.5. Image 2 ("circle" for "square"): unigrams blue | blue, square -> 1/2,
    # bigrams "a blue" shared of 2 -> 1/2, trigram 0: 10 * 1/4 = 2.5. Corpus CIDEr = mean = 5.0.
    got = caption_metrics(["a red circle", "a blue square"], ["a red circle", "a blue circle"])
    assert got["cider"] == pytest.approx(5.0, rel=1e-9)
    assert got["exact_match"] == 0.5


def test_several_references_and_bad_input():
    got = caption_metrics([["a blue square", "a red circle"]], ["a red circle ."])
    assert got["exact_match"] == 1.0
    with pytest.raises(ValueError, match="2 reference entries but 1"):
        caption_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_metrics([[]], ["a"])


def _reference_fit(x, y, num_classes, l2, lr=0.5, tol=1e-12):
    """Plain full-batch gradient descent on the same objective, gradient written out by hand (the oracle)."""
    x = x.double()
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    onehot = F.one_hot(y, num_classes).double()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    b = torch.zeros(num_classes, dtype=torch.float64)
    for _ in range(100_000):
        err = (torch.softmax(z @ w.T + b, 1) - onehot) / len(y)  # d(mean CE)/d(logits)
        gw, gb = err.T @ z + l2 * w, err.sum(0)
        w, b = w - lr * gw, b - lr * gb
        if max(gw.abs().max().item(), gb.abs().max().item()) < tol:
            break
    return torch.softmax(z @ w.T + b, 1)


def test_logistic_regression_matches_gradient_descent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 7, generator=g) * torch.tensor([1.0, 3.0, 0.1, 1.0, 2.0, 1.0, 5.0]) + 2.0
    y = (x[:, 0] + 0.3 * x[:, 1] - 0.5 * x[:, 4] + 0.7 * torch.randn(90, generator=g) > 2.0).long()
    y = y + (x[:, 6] > 2.0).long()  # 3 classes, overlapping
    probe = fit_linear_probe(x, y, 3, l2=0.1)
    probs = torch.softmax(probe.logits(x), 1)
    torch.testing.assert_close(probs, _reference_fit(x, y, 3, l2=0.1), rtol=0, atol=1e-6)
    # at the optimum the gradient of the (strictly convex in W) objective vanishes
    w, b = probe.weight.clone().requires_grad_(), probe.bias.clone().requires_grad_()
    z = (x.double() - probe.mean) / probe.std
    loss = F.cross_entropy(z @ w.T + b, y) + 0.05 * w.square().sum()
    assert max(t.abs().max().item() for t in torch.autograd.grad(loss, (w, b))) < 1e-7


def test_probe_accuracy_on_separable_data():
    x = torch.tensor([[-2.0], [-1.5], [-1.0], [1.0], [1.5], [2.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    res = linear_probe(x, y, torch.tensor([[-3.0], [-0.2], [0.3], [4.0]]), torch.tensor([0, 0, 1, 1]), 2)
    assert res == {"top1": 1.0, "train_top1": 1.0, "chance": 0.5}


def test_encoder_features_are_per_image_means(tmp_path):
    from genlip_fast.model import GenLIP, get_preset

    from genlip_fast.speak import VisionEncoder

    torch.manual_seed(0)
    model = GenLIP(get_preset("tiny", vocab_size=64, attn_backend="reference", ce_backend="reference")).eval()
    encoder = VisionEncoder(model, drop_text=False)
    g = torch.Generator().manual_seed(1)
    grids = [(2, 3), (4, 4), (1, 1), (3, 2)]
    images = [(torch.randn(h * w, 768, generator=g), (h, w)) for h, w in grids]
    # packs of at most 17 tokens: (6) (16) (1, 6); every image must come out as if encoded alone
    feats = encoder_features(encoder, images, max_tokens=17)
    assert feats.shape == (4, 128) and feats.dtype == torch.float32
    for i, img in enumerate(images):
        alone = encoder_features(encoder, [img], max_tokens=10_000)
        torch.testing.assert_close(feats[i], alone[0], rtol=1e-5, atol=1e-5)
    # the plain reference: final-norm states of the image alone, full attention, averaged over its patches
    from genlip_fast.data.packing import pack_images

    ref = model.hidden_states(pack_images([images[1][0]], [grids[1]]), full_attention=True).mean(0)
    torch.testing.assert_close(feats[1], ref, rtol=1e-5, atol=1e-5)


def test_image_folder_reads_the_demo_probe_set_and_names_bad_input(tmp_path):
    root = tmp_path / "probe"
    generate_probe_set(root, num_train=8, num_val=4, size=32)
    train = ImageFolder.read(root / "train")
    assert train.classes == sorted(SHAPES) and len(train.paths) == 8
    assert [train.classes[i] for i in train.labels] == [p.parent.name for p in train.paths]
    images = train.decode(ImageTransform(image_size=32))
    assert len(images) == 8 and images[0][1] == (2, 2) and images[0][0].shape == (4, 768)
    with pytest.raises(FileExistsError, match="train"):
        generate_probe_set(root, num_train=4, num_val=4)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder.read(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder.read(tmp_path / "flat")
    (root / "val" / "hexagon").mkdir()
    (root / "val" / "hexagon" / "1.jpg").write_bytes((root / "train" / "circle" / "00000.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"\['hexagon'\]"):
        ImageFolder.read(root / "val", classes=train.classes)
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"\['empty'\]"):
        ImageFolder.read(root / "train")
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        ImageFolder.read(bad).decode(ImageTransform(image_size=32))
