"""The model's own pieces: CPU dropout, padding, bf16 autocast, checkpoint round trip."""

import torch

from trainers.scgpt.model import Dropout, ScGPT, ScGPTConfig, load_checkpoint, save_checkpoint


def _model(**kw) -> ScGPT:
    torch.manual_seed(0)
    return ScGPT(ScGPTConfig(vocab_size=40, d_model=32, n_heads=2, d_hid=64, n_layers=2,
                             n_cls=5, dropout=0.0, **kw))


def test_cpu_dropout_keeps_the_expected_fraction_and_scale():
    drop = Dropout(0.2).train()
    x = torch.ones(256, 1000)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (256 - 51) / 256) < 0.01  # p rounded to 51/256
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the mean
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    x.requires_grad_(True)
    drop.train()(x).sum().backward()
    grads = x.grad.unique()
    assert len(grads) == 2 and grads[0] == 0 and abs(grads[1].item() - 256 / 205) < 1e-6


def test_padding_does_not_change_the_cell_embedding():
    model = _model().eval()
    genes = torch.randint(3, 40, (1, 9))
    genes[0, 0] = 1
    values = torch.rand(1, 9) * 50
    short = model(genes, values, torch.zeros(1, 9, dtype=torch.bool), cls=True)
    padded_genes = torch.cat([genes, torch.zeros(1, 4, dtype=torch.long)], 1)
    padded_values = torch.cat([values, torch.full((1, 4), -2.0)], 1)
    pad = torch.zeros(1, 13, dtype=torch.bool)
    pad[0, 9:] = True
    padded = model(padded_genes, padded_values, pad, cls=True)
    torch.testing.assert_close(padded["cell_emb"], short["cell_emb"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded["cls_output"], short["cls_output"], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    model = _model().eval()
    genes = torch.randint(3, 40, (4, 17))
    values = torch.rand(4, 17) * 50
    pad = torch.zeros(4, 17, dtype=torch.bool)
    pad[1, 12:] = True
    ref = model(genes, values, pad, cls=True)["cls_output"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(genes, values, pad, cls=True)["cls_output"]
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)


def test_checkpoint_round_trip(tmp_path):
    model = _model(input_emb_style="category", pad_value=51, mask_value=52)
    vocab = {f"t{i}": i for i in range(40)}
    for i, special in enumerate(("<pad>", "<cls>", "<eoc>")):  # a checkpoint's vocab has them
        vocab[special] = vocab.pop(f"t{i}")
    save_checkpoint(model, vocab, tmp_path, {"label_names": list("abcde")})
    loaded, stoi, args, report = load_checkpoint(tmp_path)
    assert stoi == vocab and args["label_names"] == list("abcde") and args["MVC"] is True
    assert report.summary() == "all keys matched"
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_progress_eta_is_formatted_for_people():
    from trainers.scgpt.lightning import format_seconds

    assert [format_seconds(s) for s in (-1, 0.4, 59.4, 60, 245, 3599, 3600, 3725)] == \
        ["0s", "0s", "59s", "1m00s", "4m05s", "59m59s", "1h00m", "1h02m"]
