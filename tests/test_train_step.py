"""The streamed step (compute on each pack as it arrives, one all-reduce, gradients rescaled by the global loss-token
count) against the step it replaced (read every pack, all-reduce the count, divide each pack's loss by it before its
backward): same loss and gradients on 1 and 2 ranks of FSDP2 over gloo, with uneven packs per rank padded.

Tolerances: the two orders compute ``sum_p grad(l_p) / N`` and ``sum_p grad(l_p / N)``; every operation of the
backward is linear in its incoming gradient, so they differ only by fp32 rounding. Measured (2-core CPU, 2026-11-27,
this file's packs, 1 and 2 ranks): loss and gradient norm within 1.4e-7 relative, every gradient tensor within
9.6e-7 x its largest entry. Bounds: 1e-6 and 4e-6. A real error is far outside them (measured with the same packs:
one pack left out or counted twice moves the loss by >= 3e-4 relative and every gradient tensor by >= 0.49 x its
largest entry; a missed rescale multiplies the gradient norm by N ~ 10^2).
"""

import multiprocessing as mp

import torch
from torch.distributed.tensor import DTensor

from genlip_fast.data import Sample, pack_samples
from genlip_fast.data.tokenizer import load_tokenizer
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.train.distributed import (
    all_reduce_sum,
    apply_fsdp,
    destroy_process_group,
    init_distributed,
    mixed_precision_policy,
    shutdown,
)
from genlip_fast.train.step import grad_norm_and_clip, padding_pack, train_step

MAX_NORM = 0.5  # low enough that clipping acts, so the clip sees the rescaled gradients


def make_packs(n_packs=4, seed=0):
    """Packs of different sizes and sample layouts (odd grids, captions of 1..17 tokens)."""
    g = torch.Generator().manual_seed(seed)
    packs = []
    for p in range(n_packs):
        samples = []
        for s in range(2 + p):
            h, w = [(1, 3), (2, 2), (3, 1), (2, 3), (1, 1)][(p + s) % 5]
            n = int(torch.randint(1, 18, (1,), generator=g))
            samples.append(Sample(torch.randn(h * w, 768, generator=g), (h, w),
                                  torch.randint(1, 60, (n,), generator=g), key=f"p{p}s{s}"))
        packs.append(pack_samples(samples, max_tokens=256))
    return packs


def make_model():
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=64, attn_backend="reference", ce_backend="reference")
    return GenLIP(cfg), cfg


def full_grads(model):
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def reference_step(model, packs):
    """The trainer's step before streaming: every pack first, then each pack's loss over the global count."""
    n = all_reduce_sum(torch.tensor([float(sum(b.num_loss_tokens for b in packs))], dtype=torch.float64)).item()
    loss_sum = torch.zeros(())
    for i, b in enumerate(packs):
        model.set_requires_gradient_sync(i == len(packs) - 1)
        loss = model(b, loss_denominator=max(1.0, n))
        loss.backward()
        loss_sum += loss.detach()
    all_reduce_sum(loss_sum)
    norm = grad_norm_and_clip([p for p in model.parameters()], MAX_NORM)
    return loss_sum.item(), norm.item(), full_grads(model)


def streamed_step(model, cfg, packs, micro_steps):
    params = [p for p in model.parameters()]
    pad = padding_pack(cfg, load_tokenizer("demo"))
    st = train_step(model, params, [iter([b]) for b in packs], micro_steps, pad=pad, mcfg=cfg,
                    device=torch.device("cpu"), max_norm=MAX_NORM)
    return st.loss, st.grad_norm, full_grads(model)


def run_both(rank, world, packs):
    """(reference, streamed with even packs, streamed with rank 1 holding one pack fewer + padding)."""
    model, cfg = make_model()
    apply_fsdp(model, init_device_mesh_cpu(world), mixed_precision_policy("fp32", torch.device("cpu")))
    mine = packs[rank::world]
    ref = reference_step(model, mine)
    model.zero_grad(set_to_none=True)
    even = streamed_step(model, cfg, mine, len(mine))
    model.zero_grad(set_to_none=True)
    uneven = packs[:3] if rank == 0 else packs[3:]  # 3 packs and 1 pack: rank 1 pads twice
    padded = streamed_step(model, cfg, uneven, 3)
    return ref, even, padded


def init_device_mesh_cpu(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))


def assert_same(got, want, what):
    (l1, n1, g1), (l2, n2, g2) = got, want
    assert abs(l1 - l2) <= 1e-6 * abs(l2), (what, l1, l2)
    assert abs(n1 - n2) <= 1e-6 * abs(n2), (what, n1, n2)
    assert g1.keys() == g2.keys()
    for k in g2:
        scale = g2[k].abs().max().item() + 1e-30
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=4e-6 * scale, msg=lambda m, k=k: f"{what} {k}: {m}")


def test_streamed_step_equals_reading_every_pack_first_on_one_rank():
    info = init_distributed("cpu", "gloo")
    try:
        packs = make_packs()
        model, cfg = make_model()
        apply_fsdp(model, info.mesh, mixed_precision_policy("fp32", torch.device("cpu")))
        ref = reference_step(model, packs)
        model.zero_grad(set_to_none=True)
        got = streamed_step(model, cfg, packs, len(packs))
        assert_same(got, ref, "1 rank")
        model.zero_grad(set_to_none=True)
        padded = streamed_step(model, cfg, packs, len(packs) + 2)  # padding adds nothing
        assert_same(padded, ref, "1 rank + padding")
    finally:
        shutdown(info)


def _worker(rank, world, init_file, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = run_both(rank, world, make_packs())
        if rank == 0:
            torch.save(res, out)
    finally:
        destroy_process_group()


def test_two_ranks_streamed_and_padded_equal_the_reference(tmp_path):
    ctx = mp.get_context("spawn")
    out = tmp_path / "res.pt"
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "init"), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ref, even, padded = torch.load(out)
    assert_same(even, ref, "2 ranks")
    assert_same(padded, ref, "2 ranks, 3 + 1 packs, padded")
    # and the 2-rank result is the 1-rank result over the same 4 packs
    info = init_distributed("cpu", "gloo")
    try:
        model, cfg = make_model()
        apply_fsdp(model, info.mesh, mixed_precision_policy("fp32", torch.device("cpu")))
        one = streamed_step(model, cfg, make_packs(), 4)
    finally:
        shutdown(info)
    assert_same(ref, one, "2 ranks vs 1 rank")
