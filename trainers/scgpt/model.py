"""An scGPT-compatible transformer for single-cell expression, in one file.

Read top to bottom: config, a CPU-friendly dropout, the input encoders (gene token +
expression value), the transformer block (post-norm, fused qkv,
`F.scaled_dot_product_attention`), the heads (expression decoder for masked-gene
pretraining, scGPT's MVC decoder that predicts expression from the cell embedding, the
cell-type classifier), the model, and finally the scGPT checkpoint folder format
(`args.json`, `vocab.json`, `best_model.pt`). Under autocast it runs in bf16 (the
trainer's default on GPUs and on AMX CPUs).

Shapes: B cells in a batch, T tokens per cell (position 0 is `<cls>`), C = d_model.

The module layout mirrors scGPT 0.2.4's `TransformerModel` (`encoder`, `value_encoder`,
`decoder`, `mvc_decoder`, `cls_decoder` keep scGPT's parameter names); only the
transformer layers (and the classifier's layer list) are named our own way
(`blocks.N.attn.qkv`, ...) and mapped from scGPT's names in `scgpt_to_ours()`, which
accepts both the PyTorch (`self_attn.in_proj_weight`) and the flash-attention
(`self_attn.Wqkv.weight`) spelling.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers import family
from trainers.scgpt import checkpoint_args
from trainers.scgpt.checkpoint_args import EOC, PAD

INPUT_EMB_STYLES = ("continuous", "category")


@dataclass
class ScGPTConfig:
    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    d_hid: int = 256
    n_layers: int = 4
    n_layers_cls: int = 3  # depth of the classifier MLP, as scGPT's ClsDecoder(nlayers=3)
    n_cls: int = 1
    do_mvc: bool = True  # scGPT's MVC/GEPC head: predict expression from the cell embedding
    dropout: float = 0.1
    pad_token_id: int = 0
    n_bins: int = 51
    input_emb_style: str = "continuous"  # scGPT's "scaling" style is not supported
    # Value conventions of scGPT's tutorials: continuous inputs pad with -2 and mask
    # with -1; category inputs reserve two extra bins for pad (n_bins) and mask (n_bins+1).
    pad_value: float = -2.0
    mask_value: float = -1.0

    def __post_init__(self):
        if self.input_emb_style not in INPUT_EMB_STYLES:
            raise ValueError(f"input_emb_style must be one of {INPUT_EMB_STYLES}, "
                             f"got {self.input_emb_style!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by "
                             f"n_heads ({self.n_heads})")


class Dropout(nn.Module):
    """nn.Dropout, except that on CPU the mask comes from random bytes.

    CPU dropout draws one random number per element, which costs more than the matmul
    it follows; drawing 64-bit words and reading them as 8 bytes needs one draw per 8
    elements (~4x cheaper overall). The drop probability is then rounded to a multiple
    of 1/256 (0.2 -> 51/256). Other devices use F.dropout.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        k = round(self.p * 256)  # drop the bytes below k
        n = x.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-2**63, None)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= k
        return x * keep * (256 / (256 - k))

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ---------------------------------------------------------------- input encoders

class GeneEncoder(nn.Module):
    """Gene token -> vector (scGPT's GeneEncoder: embedding + LayerNorm)."""

    def __init__(self, vocab_size: int, d_model: int, padding_idx: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, genes: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(genes))


class ContinuousValueEncoder(nn.Module):
    """Scalar expression value -> vector through a 1 -> C -> C MLP (scGPT's default)."""

    def __init__(self, d_model: int, dropout: float, max_value: float = 512):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: Tensor) -> Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class CategoryValueEncoder(nn.Module):
    """Binned expression value -> vector through an embedding table."""

    def __init__(self, n_input_bins: int, d_model: int, padding_idx: int):
        super().__init__()
        self.embedding = nn.Embedding(n_input_bins, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, values: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(values.long()))


# ---------------------------------------------------------------- transformer

class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        # q, k and v in one matmul; the row layout [q; k; v] is the one of PyTorch's
        # in_proj_weight and of flash-attn's Wqkv, so scGPT weights load unchanged.
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, keep: Tensor | None, first_only: bool = False) -> Tensor:
        """(B, T, C) -> (B, T, C); with `first_only` (B, 1, C): position 0 attends to every
        position, and no other position's query is computed."""
        B, T, C = x.shape
        nh, hs = self.n_heads, C // self.n_heads
        if first_only:  # the query of position 0, keys and values of all: rows [q; k; v]
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :1], w[:C], b[:C]).view(B, 1, 1, nh, hs)
            k, v = F.linear(x, w[C:], b[C:]).view(B, T, 2, nh, hs).unbind(2)
            q, T = q[:, :, 0], 1
        else:
            q, k, v = self.qkv(x).view(B, T, 3, nh, hs).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # No dropout on the attention weights (scGPT's nn.MultiheadAttention has it): the
        # fused SDPA kernels on CPU refuse dropout and the fallback is 2-3x slower.
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU's fused bf16 attention is slower than its fp32 one (measured on AMX
            # Xeons), while the bf16 matmuls around it are much faster: attend in fp32.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                   attn_mask=keep).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Post-norm encoder layer, as nn.TransformerEncoderLayer(norm_first=False, relu)."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float):
        super().__init__()
        self.attn = SelfAttention(d_model, n_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, d_hid)
        self.ff_out = nn.Linear(d_hid, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor | None, first_only: bool = False) -> Tensor:
        """(B, T, C) -> (B, T, C), or (B, 1, C) for position 0 alone with `first_only`."""
        a = self.attn(x, keep, first_only)
        x = self.norm1((x[:, :1] if first_only else x) + self.drop(a))
        ff = self.ff_out(self.drop(F.relu(self.ff_in(x))))
        return self.norm2(x + self.drop(ff))


# ---------------------------------------------------------------- heads

class ExprDecoder(nn.Module):
    """Per-token expression value prediction (masked gene-expression modelling)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_model, d_model), nn.LeakyReLU(),
            nn.Linear(d_model, d_model), nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(h).squeeze(-1)  # (B, T)


class ClsDecoder(nn.Module):
    """Cell embedding -> class logits: (n_layers - 1) x [Linear, ReLU, LayerNorm] + Linear."""

    def __init__(self, d_model: int, n_cls: int, n_layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(n_layers - 1):
            self.layers.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.out_layer(x)


class MVCDecoder(nn.Module):
    """Expression of each gene predicted from the cell embedding (scGPT's MVCDecoder,
    "inner product" style): value = <W sigmoid(gene2query(gene_emb)), cell_emb>.

    Pretraining with it (scGPT's GEPC objective) is what teaches `<cls>` to summarise the
    cell; masked-gene modelling alone never trains the `<cls>` output.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_model, bias=False)

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> Tensor:
        """cell_emb (N, C) and the gene token embeddings to score (N, C) -> (N,)."""
        query = self.query_activation(self.gene2query(gene_embs))
        return (self.W(query) * cell_emb).sum(-1)


# ---------------------------------------------------------------- the model

class ScGPT(nn.Module):
    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = GeneEncoder(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
        if c.input_emb_style == "continuous":
            self.value_encoder = ContinuousValueEncoder(c.d_model, c.dropout)
        else:
            self.value_encoder = CategoryValueEncoder(
                c.n_bins + 2, c.d_model, padding_idx=int(c.pad_value))
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.d_hid, c.dropout) for _ in range(c.n_layers))
        self.decoder = ExprDecoder(c.d_model)
        self.cls_decoder = ClsDecoder(c.d_model, c.n_cls, c.n_layers_cls)
        self.mvc_decoder = MVCDecoder(c.d_model) if c.do_mvc else None
        # scGPT's init_weights(): only the gene embedding is re-initialised.
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    def encode(self, genes: Tensor, values: Tensor, pad_mask: Tensor,
               cls_only: bool = False) -> Tensor:
        """genes, values, pad_mask (True = padding): (B, T) -> hidden states (B, T, C).

        `cls_only`: just the `<cls>` output (B, C), the cell embedding the classifier reads.
        The same values (to float rounding), for less work: the last layer computes only
        position 0 (its query, attention row, feed-forward), since no other position's
        output is read (on the fine-tuning config about a fifth of a training step).
        """
        x = self.encoder(genes) + self.value_encoder(values)
        # SDPA takes a boolean "may attend" mask; without padding we pass none, which
        # lets the fused kernels run unmasked.
        keep = None if not pad_mask.any() else ~pad_mask[:, None, None, :]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, keep, first_only=cls_only and i == last)
        return x[:, 0] if cls_only else x

    def forward(self, genes: Tensor, values: Tensor, pad_mask: Tensor,
                cls: bool = False, mvc: bool = False) -> dict[str, Tensor]:
        """All heads at every position, as scGPT's forward(CLS=..., MVC=...)."""
        h = self.encode(genes, values, pad_mask)
        out = {"mlm_output": self.decoder(h), "cell_emb": h[:, 0, :]}  # <cls> at position 0
        if cls:
            out["cls_output"] = self.cls_decoder(out["cell_emb"])
        if mvc:
            cell = out["cell_emb"][:, None, :].expand_as(h)
            out["mvc_output"] = self.mvc_decoder(cell, self.encoder(genes))
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------- scGPT checkpoint folders
#
# scGPT ships a model as a folder: args.json (its training script's arguments),
# vocab.json (token -> id) and best_model.pt (a state dict). The names below are the
# argument names of scGPT's pretraining/fine-tuning scripts.

ARGS_TO_CONFIG = {  # scGPT args.json key -> ScGPTConfig field
    "embsize": "d_model", "nheads": "n_heads", "d_hid": "d_hid", "nlayers": "n_layers",
    "n_layers_cls": "n_layers_cls", "dropout": "dropout", "n_bins": "n_bins",
    "input_emb_style": "input_emb_style", "pad_value": "pad_value",
    "mask_value": "mask_value",
}

_LAYER_RENAMES = [  # (scGPT suffix inside transformer_encoder.layers.N, ours inside blocks.N)
    (r"self_attn\.in_proj_(weight|bias)", r"attn.qkv.\1"),  # PyTorch MultiheadAttention
    (r"self_attn\.Wqkv\.(weight|bias)", r"attn.qkv.\1"),  # flash-attn FlashMHA
    (r"self_attn\.out_proj\.(weight|bias)", r"attn.out_proj.\1"),
    (r"linear1\.(weight|bias)", r"ff_in.\1"),
    (r"linear2\.(weight|bias)", r"ff_out.\1"),
    (r"norm1\.(weight|bias)", r"norm1.\1"),
    (r"norm2\.(weight|bias)", r"norm2.\1"),
]


def scgpt_to_ours(key: str) -> str | None:
    """Map one scGPT state-dict key to ours; None when the key has no counterpart."""
    m = re.fullmatch(r"transformer_encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        layer, rest = m.groups()
        for pattern, repl in _LAYER_RENAMES:
            if re.fullmatch(pattern, rest):
                return f"blocks.{layer}." + re.sub(pattern, repl, rest)
        return None  # e.g. flash-attn's parameterless inner_attn
    m = re.fullmatch(r"cls_decoder\._decoder\.(\d+)\.(.+)", key)
    if m:
        return f"cls_decoder.layers.{m.group(1)}.{m.group(2)}"
    return key


def ours_to_scgpt(key: str) -> str:
    """Inverse of scgpt_to_ours, writing PyTorch (non-flash) names."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        layer, rest = m.groups()
        rest = {"attn.qkv.weight": "self_attn.in_proj_weight",
                "attn.qkv.bias": "self_attn.in_proj_bias"}.get(rest, rest)
        rest = rest.replace("attn.out_proj.", "self_attn.out_proj.")
        rest = rest.replace("ff_in.", "linear1.").replace("ff_out.", "linear2.")
        return f"transformer_encoder.layers.{layer}.{rest}"
    m = re.fullmatch(r"cls_decoder\.layers\.(\d+)\.(.+)", key)
    if m:
        return f"cls_decoder._decoder.{m.group(1)}.{m.group(2)}"
    return key


@dataclass
class LoadReport:
    """What happened to each key when loading an scGPT state dict into ScGPT."""
    missing: list[str]  # our parameters the checkpoint did not provide (left as initialised)
    unexpected: list[str]  # checkpoint keys we have no place for (e.g. mvc_decoder.*)
    shape_mismatch: list[str]  # present on both sides with different shapes (not loaded)

    def summary(self) -> str:
        parts = []
        for name in ("missing", "unexpected", "shape_mismatch"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {name}: {shown}")
        return "; ".join(parts) or "all keys matched"


# An scGPT checkpoint folder that cannot be used: `field` names the file at fault, with the
# args.json key where there is one (`vocab.json`, `args.json.pre_norm`, `best_model.pt`).
CheckpointError = family.CheckpointError


def match_state_dict(ours: dict[str, Tensor], state: dict[str, Tensor],
                     allow_missing: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], LoadReport]:
    """An scGPT (or our own) state dict in our names, checked against our `ours` (a model's
    state dict, real or on the meta device) -> (what to load, LoadReport).

    Keys whose shape differs are skipped and reported (e.g. a classifier head trained for
    a different number of classes). A missing key is an error unless it starts with one
    of `allow_missing` (e.g. "cls_decoder." when fine-tuning a pretrained base).
    """
    mapped, unexpected, mismatch = {}, [], []
    for key, value in state.items():
        name = scgpt_to_ours(key)
        if name is None or name not in ours:
            if name is not None or "inner_attn" not in key:
                unexpected.append(key)
            continue
        if ours[name].shape != value.shape:
            mismatch.append(f"{key} {tuple(value.shape)} vs {tuple(ours[name].shape)}")
            continue
        mapped[name] = value
    missing = [k for k in ours if k not in mapped]
    report = LoadReport(missing, unexpected, mismatch)
    hard_missing = [k for k in missing if not k.startswith(allow_missing)]
    if hard_missing:
        raise CheckpointError(f"best_model.pt does not match the model args.json describes: "
                              f"{report.summary()}", "best_model.pt")
    return mapped, report


def load_scgpt_state_dict(model: ScGPT, state: dict[str, Tensor],
                          allow_missing: tuple[str, ...] = ()) -> LoadReport:
    """Copy an scGPT (or our own) state dict into `model` (see match_state_dict)."""
    mapped, report = match_state_dict(model.state_dict(), state, allow_missing)
    model.load_state_dict(mapped, strict=False)
    return report


# What a checkpoint folder must hold. What its args.json and vocab.json must say is declared
# once, torch-free, in trainers/scgpt/checkpoint_args.py (the host checks a parent with it
# before any debit).
CHECKPOINT_FILES = ("args.json", "vocab.json", "best_model.pt")


def check_args(args) -> None:
    """Raise CheckpointError (field `args.json.<key>`) unless args.json describes a network
    this model builds (checkpoint_args.read_args: the architecture keys present and sane, no
    unsupported setting, sane values for the other keys ScGPTConfig reads)."""
    _raise_first(checkpoint_args.read_args(args)[1])


def check_vocab(vocab) -> None:
    """Raise CheckpointError (field `vocab.json`) unless vocab.json numbers the embedding's
    rows 0..n-1, each once, and has the special tokens the tokenizer needs
    (checkpoint_args.read_vocab)."""
    _raise_first(checkpoint_args.read_vocab(vocab)[1])


def _raise_first(problems: list) -> None:
    """CheckpointError blaming the first problem's field, saying every problem."""
    if problems:
        raise CheckpointError("; ".join(f"{p.field} {p.message}" for p in problems),
                              problems[0].field)


def config_from_args(args: dict, vocab_size: int, pad_token_id: int, n_cls: int = 1,
                     do_mvc: bool | None = None) -> ScGPTConfig:
    """Build our config from an scGPT args.json dict (do_mvc: has an MVC head)."""
    check_args(args)
    kw = {ours: args[theirs] for theirs, ours in ARGS_TO_CONFIG.items()
          if args.get(theirs) is not None}
    if kw.get("input_emb_style") == "category":
        # scGPT tutorials: pad with bin n_bins, mask with bin n_bins + 1
        kw.setdefault("pad_value", args.get("n_bins", 51))
        kw.setdefault("mask_value", args.get("n_bins", 51) + 1)
    if do_mvc is None:
        do_mvc = bool(args.get("MVC", False))
    return ScGPTConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, n_cls=n_cls,
                       do_mvc=do_mvc, **kw)


def config_to_args(config: ScGPTConfig, extra: dict | None = None) -> dict:
    """An args.json dict in scGPT's naming (its tutorial scripts' argument names)."""
    args = {theirs: getattr(config, ours) for theirs, ours in ARGS_TO_CONFIG.items()}
    args.update(pad_token="<pad>", input_style="binned", max_seq_len=None,
                n_cls=config.n_cls, MVC=config.do_mvc, fast_transformer=False, pre_norm=False)
    args.update(extra or {})
    return args


def read_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict, dict[str, int], dict[str, Tensor]]:
    """args.json, vocab.json and best_model.pt of an scGPT folder, checked on their own and
    against each other (the vocabulary numbers the gene embedding's rows); CheckpointError
    names the file at fault.

    A vocabulary without `<eoc>` (which the model never reads) gets it appended, with a zero
    embedding row, as scGPT's cell_emb appends missing specials: the tokenizer's vocabulary
    always has it, and vocab.json must keep matching the embedding when the model is saved.
    """
    folder = Path(folder)
    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not an scGPT checkpoint folder: no {name}", name)
    args, vocab = _read_json(folder, "args.json"), _read_json(folder, "vocab.json")
    check_args(args)
    check_vocab(vocab)
    try:
        state = torch.load(folder / "best_model.pt", map_location=map_location,
                           weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever torch.load trips on, the file is at fault
        raise CheckpointError(f"best_model.pt cannot be read as a state dict: "
                              f"{type(e).__name__}: {str(e)[:300]}", "best_model.pt") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError("best_model.pt is not a state dict (parameter name -> tensor)",
                              "best_model.pt")
    emb = state.get("encoder.embedding.weight")
    if emb is None or emb.ndim != 2:
        raise CheckpointError("best_model.pt has no gene embedding (encoder.embedding.weight)",
                              "best_model.pt")
    if emb.shape[0] != len(vocab):
        raise CheckpointError(f"vocab.json has {len(vocab)} tokens but the gene embedding in "
                              f"best_model.pt has {emb.shape[0]} rows", "vocab.json")
    if EOC not in vocab:
        vocab = {**vocab, EOC: len(vocab)}
        row = emb.new_zeros(1, emb.shape[1])
        state = {**state, "encoder.embedding.weight": torch.cat([emb, row])}
    return args, vocab, state


def _read_json(folder: Path, name: str):
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{name} cannot be read as JSON: {str(e)[:300]}", name) from None


def _config(args: dict, vocab: dict[str, int], state: dict[str, Tensor],
            n_cls: int | None) -> ScGPTConfig:
    if n_cls is None:
        out = state.get("cls_decoder.out_layer.weight")
        n_cls = int(out.shape[0]) if out is not None else int(args.get("n_cls", 1))
    # the MVC head exists when the weights have it (scGPT's args.json spells it variously)
    do_mvc = any(k.startswith("mvc_decoder.") for k in state)
    return config_from_args(args, len(vocab), vocab[PAD], n_cls, do_mvc)


def check_checkpoint(folder: str | Path) -> LoadReport:
    """Everything load_checkpoint checks, without building the model's weights (it is laid
    out on the meta device): the trainer runs this on a parent before reading any data."""
    args, vocab, state = read_checkpoint(folder)
    with torch.device("meta"):
        ours = ScGPT(_config(args, vocab, state, None)).state_dict()
    return match_state_dict(ours, state, allow_missing=("cls_decoder.",))[1]


def load_checkpoint(folder: str | Path, n_cls: int | None = None,
                    map_location: str | torch.device = "cpu"):
    """Load an scGPT checkpoint folder -> (model, vocab dict, args dict, LoadReport).

    `n_cls` sizes the classifier head; when it differs from the checkpoint's (or the
    checkpoint has no head), the head starts freshly initialised and is reported missing.
    CheckpointError (with the file at fault as `field`) when the folder cannot be used.
    """
    args, vocab, state = read_checkpoint(folder, map_location)
    model = ScGPT(_config(args, vocab, state, n_cls))
    report = load_scgpt_state_dict(model, state, allow_missing=("cls_decoder.",))
    return model, vocab, args, report


def save_checkpoint(model: ScGPT, vocab: dict[str, int], folder: str | Path,
                    extra_args: dict | None = None) -> dict[str, Path]:
    """Write an scGPT checkpoint folder (PyTorch key names, loadable by scGPT itself)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = config_to_args(model.config, extra_args)
    paths = {"args.json": folder / "args.json", "vocab.json": folder / "vocab.json",
             "best_model.pt": folder / "best_model.pt"}
    paths["args.json"].write_text(json.dumps(args, indent=2))
    paths["vocab.json"].write_text(json.dumps(vocab, indent=2))
    state = {ours_to_scgpt(k): v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    torch.save(state, paths["best_model.pt"])
    return paths

