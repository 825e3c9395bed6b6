"""scGPT's `args.json` and `vocab.json`, read without torch, so that the host can check a
checkpoint at registration and in a dry run, before any debit, with the trainer's own rules.

scGPT writes its training script's arguments as args.json. This module says which of them
decide the network (`ARCH_FROM_ARGS`: they become the architecture, in this project's field
names), which change the network in ways this trainer cannot build (`UNSUPPORTED`: refused
with the key named, never silently dropped), and treats the rest as the script's own
bookkeeping (lr, epochs, paths, ...), which no network depends on.
"""

from __future__ import annotations

from trainers.family import Problem
from trainers.scgpt.settings import INPUT_EMB_STYLES

# scGPT's special tokens (the tokenizer's too: trainers/scgpt/tokenize.py imports them here,
# so that this module stays free of numpy for the host's dry run).
PAD, CLS, EOC = "<pad>", "<cls>", "<eoc>"
SPECIALS = (PAD, CLS, EOC)

# scGPT args.json key -> the architecture field (trainers/scgpt/settings.py ModelSpec).
ARCH_FROM_ARGS = {"nlayers": "n_layers", "embsize": "d_model", "nheads": "n_heads",
                  "d_hid": "d_hid", "n_bins": "n_bins", "dropout": "dropout",
                  "input_emb_style": "input_emb_style"}
REQUIRED = ("embsize", "nheads", "d_hid", "nlayers")
# Settings that change the network: the one value this trainer builds. Another value is
# refused at registration and in the dry run (scGPT's defaults are these values).
UNSUPPORTED = {
    "pre_norm": False,  # post-norm transformer blocks only
    "use_batch_labels": False,  # no batch-label embedding
    "DSBN": False,  # no domain-specific batch norm
    "domain_spec_batchnorm": False,
    "explicit_zero_prob": False,  # no zero-probability head
    "input_style": "binned",  # values are binned per cell (trainers/scgpt/tokenize.py)
    "cell_emb_style": "cls",  # the cell embedding is the <cls> token's
}
REQUIRED_SPECIALS = (PAD, CLS)  # <eoc> is appended when missing, as scGPT's cell_emb does


def read_args(args) -> tuple[dict, list[Problem]]:
    """The architecture an args.json describes (this project's names), and its problems."""
    if not isinstance(args, dict):
        return {}, [Problem("invalid_checkpoint", "args.json", "is not a JSON object")]
    problems = [Problem("invalid_checkpoint", f"args.json.{key}", "is missing")
                for key in REQUIRED if key not in args]
    arch = {}
    for key, name in ARCH_FROM_ARGS.items():
        if key not in args:
            continue
        value = args[key]
        ok = (value in INPUT_EMB_STYLES if name == "input_emb_style"
              else isinstance(value, (int, float)) and not isinstance(value, bool)
              and 0 <= value < 1 if name == "dropout"
              else isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        if not ok:
            problems.append(Problem("invalid_checkpoint", f"args.json.{key}",
                                    f"{value!r} is not a valid {name}"))
        else:
            arch[name] = value
    for key, honoured in UNSUPPORTED.items():
        if key in args and args[key] != honoured and args[key] is not None:
            problems.append(Problem(
                "unsupported_checkpoint", f"args.json.{key}",
                f"is {args[key]!r}; this trainer builds only {key}={honoured!r}"))
    if "d_model" in arch and "n_heads" in arch and arch["d_model"] % arch["n_heads"]:
        problems.append(Problem("invalid_checkpoint", "args.json.nheads",
                                f"{arch['n_heads']} heads do not divide embsize "
                                f"{arch['d_model']}"))
    # the other keys the model reads (ScGPTConfig), when present
    for key in ("n_layers_cls", "n_cls"):
        value = args.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and value >= 1):
            problems.append(Problem("invalid_checkpoint", f"args.json.{key}",
                                    f"{value!r} is not a positive integer"))
    for key in ("pad_value", "mask_value"):
        value = args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(Problem("invalid_checkpoint", f"args.json.{key}",
                                    f"{value!r} is not a number"))
    if args.get("pad_token") not in (None, PAD):
        problems.append(Problem("invalid_checkpoint", "args.json.pad_token",
                                f"is {args['pad_token']!r}; the tokenizer pads with {PAD}"))
    return arch, problems


def read_vocab(vocab) -> tuple[dict, list[Problem]]:
    """{size, specials: {token: id}} of a vocab.json, and its problems: the required specials,
    and ids that are exactly 0..n-1 (the gene embedding's rows)."""
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in vocab.items()):
        return {}, [Problem("invalid_checkpoint", "vocab.json",
                            "is not a JSON object of token -> integer id")]
    problems = []
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        dupes = len(ids) - len(set(ids))
        problems.append(Problem(
            "vocab_gaps", "vocab.json",
            f"ids are not 0..{len(ids) - 1} without gaps"
            + (f" ({dupes} duplicated)" if dupes else f" (max id {ids[-1]})")))
    missing = [s for s in REQUIRED_SPECIALS if s not in vocab]
    if missing:
        problems.append(Problem("vocab_specials", "vocab.json",
                                f"lacks the special token(s) {', '.join(missing)}"))
    specials = {s: vocab.get(s) for s in SPECIALS}
    return {"size": len(vocab), "specials": specials}, problems
