"""The fine-tuning step computes only what its loss reads: `encode(..., cls_only=True)` runs
the last layer for the `<cls>` position alone. Same values and gradients as the full encode's
position 0 (to float rounding), with padding, in fp32 and under bf16 autocast."""

import torch
import torch.nn.functional as F

from trainers.scgpt.model import ScGPT, ScGPTConfig


def _model(n_layers: int = 3) -> ScGPT:
    torch.manual_seed(0)
    return ScGPT(ScGPTConfig(vocab_size=60, d_model=32, n_heads=4, d_hid=64, n_layers=n_layers,
                             n_cls=5, dropout=0.0))


def _batch(B: int = 6, T: int = 20) -> dict:
    torch.manual_seed(1)
    genes = torch.randint(3, 60, (B, T))
    genes[:, 0] = 1  # <cls>
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[2, 15:], pad[4, 10:] = True, True
    genes[pad] = 0
    values = (torch.rand(B, T) * 50).masked_fill(pad, -2.0)
    return {"genes": genes, "values": values, "pad_mask": pad,
            "labels": torch.randint(0, 5, (B,))}


def _grads(model: ScGPT, out: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    grads = torch.autograd.grad((out * weights).sum(), list(model.parameters()),
                                allow_unused=True)
    return [g for g in grads if g is not None]


def test_cls_only_encode_equals_the_full_encode_at_position_0_values_and_gradients():
    for n_layers in (1, 3):
        model = _model(n_layers).train()
        b = _batch()
        full = model.encode(b["genes"], b["values"], b["pad_mask"])
        fast = model.encode(b["genes"], b["values"], b["pad_mask"], cls_only=True)
        assert full.shape == (6, 20, 32) and fast.shape == (6, 32)
        torch.testing.assert_close(fast, full[:, 0], atol=1e-5, rtol=1e-5)
        weights = torch.randn(6, 32)  # a loss whose gradient does not cancel in LayerNorm
        g_fast, g_full = _grads(model, fast, weights), _grads(model, full[:, 0], weights)
        # the gradients reach every parameter the full path's do, and no others
        assert len(g_fast) == len(g_full)
        # fp32 noise only: the two paths reduce in other orders, and the kernels' blocking
        # (so the last bits) depends on the CPU (1.2e-6 apart on one AMD EPYC); a missing or
        # extra term would be off by the gradient's own size (about 1e-2 here)
        for a, b_ in zip(g_fast, g_full, strict=True):
            torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-4)


def test_cls_only_encode_under_bf16_autocast_is_close_to_the_full_one():
    model = _model().eval()
    b = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model.encode(b["genes"], b["values"], b["pad_mask"])[:, 0]
        fast = model.encode(b["genes"], b["values"], b["pad_mask"], cls_only=True)
    torch.testing.assert_close(fast.float(), full.float(), atol=0.05, rtol=0.05)


def test_finetune_loss_is_the_classifier_on_the_full_encodes_cls_output():
    # here, not at the top: Lightning's import (~2.5 s) would be paid by every xdist worker
    # that collects this file, not only by the one that runs this test
    from trainers.scgpt.lightning import FINETUNE, ScGPTModule

    model = _model()
    module = ScGPTModule(model, FINETUNE, lr=1e-4, n_cls=5)
    b = _batch()
    loss, out = module.compute_loss(b)
    h = model.encode(b["genes"], b["values"], b["pad_mask"])
    logits = model.cls_decoder(h[:, 0])
    torch.testing.assert_close(loss, F.cross_entropy(logits, b["labels"]), atol=1e-6, rtol=1e-5)
    assert torch.equal(out["pred"], logits.argmax(-1))
