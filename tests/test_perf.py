"""The fast CPU paths (kvfree/perf.py) compute what the reference paths compute: outputs and
every gradient in float64, for the recall presets and the layers they change."""

from __future__ import annotations

import pytest
import torch

from kvfree import perf
from kvfree.blocks import CausalConv1d
from kvfree.commands.demo import MAIN_MODELS
from kvfree.fused import causal_conv
from kvfree.mixers.fdm_cache import masked_read
from kvfree.models import LanguageModel, preset
from kvfree.train import TrainConfig, Trainer


def _grads(fn, *tensors):
    """(output, gradients of sum(output · fixed random weights) w.r.t. tensors), float64."""
    out = fn()
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), tensors)
    return out.detach(), grads


def _both(fn, *tensors):
    with perf.reference():
        ref = _grads(fn, *tensors)
    perf.set_fast(True)
    return ref, _grads(fn, *tensors)


def _assert_same(ref, fast, atol=1e-12):
    torch.testing.assert_close(fast[0], ref[0], atol=atol, rtol=1e-10)
    for a, b in zip(ref[1], fast[1]):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-10)


def test_reference_switch_restores_the_mode():
    perf.set_fast(True)
    with perf.reference():
        assert not perf.fast()
    assert perf.fast()


def test_unbind_equals_selects():
    t = torch.randn(3, 5, 2, dtype=torch.float64)
    with perf.reference():
        ref = perf.unbind(t, 1)
    assert all(torch.equal(a, b) for a, b in zip(ref, perf.unbind(t, 1)))
    assert len(ref) == 5


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_shifted_sum_equals_conv1d(k, bias):
    torch.manual_seed(0)
    conv = CausalConv1d(6, k, bias=bias).double()
    if bias:
        torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    buf = torch.randn(2, k - 1, 6, dtype=torch.float64, requires_grad=True)
    params = [x, buf, conv.weight] + ([conv.bias] if bias else [])
    ref, fast = _both(lambda: conv(x, buf)[0], *params)
    _assert_same(ref, fast)


@pytest.mark.parametrize("silu", [True, False])
def test_fused_causal_conv_passes_gradcheck(silu):
    """The hand-written backward against finite differences (float64): input, weight, bias."""
    g = torch.Generator().manual_seed(0)
    xx, w, b = (
        torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
        for s in ((2, 8, 3), (3, 4), (3,))
    )
    assert torch.autograd.gradcheck(lambda *t: causal_conv(*t, silu=silu), (xx, w, b))
    y = causal_conv(xx, w.detach(), None, silu=silu)  # only the input needs a gradient
    (grad,) = torch.autograd.grad(y.sum(), xx)
    assert grad.shape == xx.shape


def test_split_equals_slices():
    t = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    sizes = [4, 1, 4]

    def run():
        return torch.cat([p * (i + 1) for i, p in enumerate(perf.split(t, sizes))], -1)

    ref, fast = _both(run, t)
    _assert_same(ref, fast)
    with perf.reference():
        pieces = perf.split(t, sizes)
    assert [p.shape[-1] for p in pieces] == sizes


def test_masked_read_fused_attention_equals_masked_softmax():
    """PyTorch's fused attention = the masked softmax read, including rows that see nothing
    (zero output, no gradient into slot 0), float64, values and gradients."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    vis = torch.rand(2, 6, 6, generator=g) < 0.5
    vis[:, 0] = False  # the first query sees nothing
    vis[1, 3] = False
    ref, fast = _both(lambda: masked_read(q, k, v, vis, 0.5), q, k, v)
    _assert_same(ref, fast)
    assert fast[0][:, 0].abs().max() == 0 and fast[0][1, 3].abs().max() == 0


@pytest.mark.parametrize("name", MAIN_MODELS)
def test_recall_preset_fast_equals_reference(name):
    """Logits and the gradient of every parameter, whole model, float64; the reference runs at
    the presets' former chunk sizes (what bench train-speed compares against)."""
    from kvfree.bench.train_speed import REFERENCE_CHUNKS, _set_chunks

    torch.manual_seed(0)
    model = LanguageModel(preset(name)).double()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, :20] = True
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"mask": mask} if name.endswith("prefix") else {}

    def run():
        return model(ids, **kw)[0]

    with perf.reference():
        _set_chunks(model, REFERENCE_CHUNKS)
        ref = _grads(run, *params)
        chunks = {m.name: getattr(m, "chunk_size", None) for m in model.mixers()}
    model = LanguageModel(preset(name)).double()  # fresh: the preset's own chunk sizes
    model.load_state_dict(dict(zip([n for n, _ in model.named_parameters()], params)))
    params = [p for p in model.parameters() if p.requires_grad]
    fast = _grads(run, *params)
    _assert_same(ref, fast, atol=1e-10)
    if name in ("recall-mamba2", "recall-gdn"):  # the reference really ran at other chunks
        assert any(chunks[k] == v for k, v in REFERENCE_CHUNKS.items() if k in chunks)


def test_select_gives_the_logits_of_the_selected_positions():
    torch.manual_seed(0)
    model = LanguageModel(preset("recall-gdn")).double()
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    select = torch.rand(3, 17) < 0.3
    full, _ = model(ids)
    part, _ = model(ids, select=select)
    torch.testing.assert_close(part, full[select])


def test_trainer_loss_on_scored_positions_equals_full_loss():
    """One train step in each mode from the same init: same loss, same parameters after."""

    def step():
        torch.manual_seed(0)
        model = LanguageModel(preset("recall-attention")).double()
        ids = torch.randint(0, model.config.vocab_size, (4, 24))
        labels = torch.full_like(ids, -100)
        labels[:, -5:] = ids[:, -5:]
        tr = Trainer(model, TrainConfig(steps=1, device="cpu", progress=False), lambda s: None)
        loss = tr.train_step({"inputs": ids, "labels": labels})
        return loss, [p.detach().clone() for p in model.parameters()]

    with perf.reference():
        ref_loss, ref_params = step()
    loss, params = step()
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_tune_allocator_is_off_in_reference_mode(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with perf.reference():
        assert perf.tune_allocator() is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert perf.tune_allocator() is False  # the user's own setting wins


def test_flush_denormals_zeroes_subnormals_only_in_fast_mode():
    tiny = torch.tensor([1e-39, 1e-30], dtype=torch.float32)  # subnormal, normal
    try:
        with perf.reference():
            assert perf.flush_denormals() is False
            assert (tiny * 1.0)[0] > 0
        if not perf.flush_denormals():
            pytest.skip("this CPU cannot flush denormals")
        out = tiny * 1.0
        assert out[0] == 0 and out[1] == tiny[1]
    finally:
        torch.set_flush_denormal(False)


def test_flushed_denormals_restores_the_mode():
    """A library call (run_job, kvfree train in-process) leaves the process's mode as it was."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    torch.set_flush_denormal(False)
    with perf.flushed_denormals() as on:
        if on:
            assert (tiny * 1.0)[0] == 0
    assert (tiny * 1.0)[0] > 0
