"""The reference pages, generated from the code when MkDocs builds the site (mkdocs.yml
`hooks:`), so they cannot drift from it:

- training keys per family: trainers.family's declarations (types, defaults, `ranges`,
  `choices`) with a description from DESCRIPTIONS below; a key without one stops the build;
- the CLI: `runner.cli.main`'s commands, each printed by click's own help formatter;
- reason codes: every ForgeError subclass under runner/ (its `reason` and docstring), and
  the reasons raised ad hoc (`SomeError(..., reason="...")`), read from the source by `ast`.

A page under docs/reference/ holds its introduction and a marker line, `<!-- generated: NAME
-->`, which `on_page_markdown` replaces with GENERATORS[NAME](). The functions return
markdown and are imported by tests/test_docs.py.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- generated: ([a-z_]+) -->$", re.MULTILINE)


class MissingDescription(ValueError):
    """A declared key the reference cannot describe: add it to DESCRIPTIONS."""


# --- training keys ----------------------------------------------------------------------------

# One line per key a caller may read about: "training.<key>" and "model.<key>" (the
# architecture). A family's own entry wins over "*" (the keys every family shares).
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "*": {
        "training.task": "What to train: one of the family's tasks (a `training=` option "
                         "sets it).",
        "training.seed": "Seed of the training run (weights, batches, dropout).",
        "training.num_threads": "CPU threads inside the sandbox; null: all cores.",
        "training.val_fraction": "Fraction of the cells held out for validation (early "
                                 "stopping, the best epoch).",
        "training.test_fraction": "Fraction of the cells held out for the test metrics and "
                                  "the eval gate; the host rebuilds the same cells.",
        "training.split_seed": "Seed of the stratified train/val/test split; null: follows "
                               "`seed`. Keep it fixed to compare versions on the same cells.",
        "training.lr": "Learning rate.",
        "training.max_epochs": "Most epochs to train; early stopping may end sooner.",
        "training.batch_size": "Cells per training batch.",
        "training.weight_decay": "Weight decay (L2) of the optimiser.",
        "training.limit_train_batches": "Batches per training epoch; null: all (smoke runs "
                                        "and tests set it).",
        "training.log_every_n_steps": "A progress line and step metrics every N steps.",
    },
    "scgpt": {
        "training.precision": "auto: bf16-mixed on GPUs and on CPUs with AMX or AVX512-BF16, "
                              "else 32 (fp32).",
        "training.max_seq_len": "Tokens per cell, including `<cls>`: the expressed genes "
                                "sampled per cell.",
        "training.mask_ratio": "pretrain_mgm: fraction of the expressed genes masked.",
        "training.early_stopping_patience": "Epochs without a validation improvement before "
                                            "stopping; 0 disables.",
        "training.limit_eval_batches": "Validation batches per epoch; null: all. The test "
                                       "pass always scores every held-out cell.",
        "training.warmup_steps": "Linear warm-up steps, then cosine decay to 10% at the "
                                 "last step.",
        "training.eval_batch_size": "Cells per evaluation batch; null: 2 x batch_size.",
        "training.class_weighting": "Cross-entropy class weights: none, balanced, or sqrt "
                                    "(inverse square root of the class frequency).",
        "training.grad_clip": "Gradient-norm clip; null disables.",
        "training.include_zero_gene": "Also sample unexpressed genes as tokens.",
        "model.n_layers": "Transformer blocks.",
        "model.d_model": "Embedding width.",
        "model.n_heads": "Attention heads; must divide d_model.",
        "model.d_hid": "Width of each block's feed-forward layer.",
        "model.dropout": "Dropout in the blocks (may differ from the parent's).",
        "model.n_bins": "Expression bins of the value encoder (at least 3).",
        "model.input_emb_style": "How values are encoded: category (binned) or continuous.",
    },
    "scvi": {
        "training.early_stopping_patience": "Epochs without improvement (pretraining: "
                                            "validation ELBO; fine-tune: validation "
                                            "classification loss) before stopping; 0 "
                                            "disables.",
        "training.n_samples_per_label": "scANVI: labelled cells drawn per class per epoch; "
                                        "null: scvi-tools' default.",
        "training.log_every_n_steps": "Lightning's logging interval, in steps.",
        "model.n_latent": "Latent dimensions (scANVI's classifier reads the latent).",
        "model.n_hidden": "Hidden units per layer of the encoder and decoder.",
        "model.n_layers": "Hidden layers of the encoder and decoder.",
        "model.dropout_rate": "Dropout of the encoder (part of the architecture: a fine-tune "
                              "keeps the parent's).",
        "model.gene_likelihood": "The count distribution: nb, zinb or poisson.",
    },
    "linear": {
        "training.C": "Inverse L2 regularisation strength.",
        "training.max_iter": "Most lbfgs iterations.",
        "training.tol": "lbfgs stopping tolerance.",
        "training.class_weight": "none, or balanced (weights inverse to class frequency).",
        "model.features": "Input features: log1p_cp10k (counts scaled to 10k per cell, then "
                          "log1p).",
        "model.standardize": "Z-score each gene on the train cells.",
    },
}

_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if args:  # `int | None`
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return getattr(tp, "__name__", str(tp))


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _range(key: str, ranges: dict, choices: dict) -> str:
    if key in choices:
        return " \\| ".join(choices[key])
    bounds = ranges.get(key) or {}
    return ", ".join(f"{_BOUNDS[k]} {_value(b)}" for k, b in bounds.items() if k in _BOUNDS)


def describe(family: str, path: str) -> str:
    """DESCRIPTIONS' line for `path` ("training.lr") of `family`; MissingDescription if none."""
    text = DESCRIPTIONS.get(family, {}).get(path) or DESCRIPTIONS["*"].get(path)
    if not text:
        raise MissingDescription(
            f"{path} of family {family} has no description: add it to DESCRIPTIONS in "
            "docs/hooks/reference.py")
    return text


def _prose(text: str) -> str:
    """A docstring or a fix as one table cell: one line, and `<pad>` outside code shown as
    text rather than taken for HTML."""
    parts = " ".join(text.split()).split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;")
                    for i, p in enumerate(parts))


def _rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows]
    return out


def training_keys_markdown(families: list | None = None) -> str:
    """Per family: its tasks, then every training key (type, default, per-task defaults,
    range, description) and every architecture key. Raises MissingDescription when a key has
    no description, naming every such key."""
    from trainers import family as family_mod
    from trainers import manifest

    families = family_mod.all_families() if families is None else families
    missing: list[str] = []

    def text(name: str, path: str) -> str:
        try:
            return describe(name, path)
        except MissingDescription as exc:
            missing.append(str(exc).split(" has no description")[0])
            return ""

    head = typing.get_type_hints(manifest.Manifest)
    fields = {f.name: f for f in dataclasses.fields(manifest.Manifest)}
    out = ["## Every family", "",
           "Set by the `training=` option (`conf/training/`); `seed` and `num_threads` by "
           "a caller too.", ""]
    out += _rows(("key", "type", "default", "description"),
                 [(f"`training.{k}`", _type_name(head[k]),
                   "the option's" if fields[k].default is dataclasses.MISSING
                   else _value(fields[k].default), text("*", f"training.{k}"))
                  for k in manifest.CONFIG_TRAINING_FIELDS])
    for fam in families:
        hints = typing.get_type_hints(fam.training)
        tasks = ", ".join(f"`{t}` ({metric})" for t, metric in fam.tasks.items())
        out += ["", f"## {fam.name}", "", fam.summary + ".", "",
                f"Tasks (primary metric): {tasks}.", "", "### Training keys", ""]
        rows = []
        for f in dataclasses.fields(fam.training):
            per_task = "; ".join(f"{task}: {_value(d[f.name])}"
                                 for task, d in fam.task_defaults.items() if f.name in d)
            default = _value(f.default) + (f" ({per_task})" if per_task else "")
            rows.append((f"`training.{f.name}`", _type_name(hints[f.name]), default,
                         _range(f.name, fam.ranges, fam.choices),
                         text(fam.name, f"training.{f.name}")))
        out += _rows(("key", "type", "default", "range", "description"), rows)
        out += ["", f"### Architecture (`model.*`, read from the parent's {fam.arch_source})",
                ""]
        hints = typing.get_type_hints(fam.architecture)
        rows = [(f"`{f.name}`", _type_name(hints[f.name]),
                 _value(fam.arch_defaults.get(f.name)) if f.name in fam.arch_defaults
                 else "the parent's", _range(f.name, {}, fam.choices),
                 text(fam.name, f"model.{f.name}"))
                for f in dataclasses.fields(fam.architecture)]
        out += _rows(("key", "type", "default", "choices", "description"), rows)
    if missing:
        raise MissingDescription("no description for " + ", ".join(missing)
                                 + ": add them to DESCRIPTIONS in docs/hooks/reference.py")
    return "\n".join(out) + "\n"


# --- the CLI ----------------------------------------------------------------------------------

def cli_markdown() -> str:
    """Every command of `forge` (runner.cli.main), depth first, with click's own help text."""
    import click

    from runner.cli import main

    out: list[str] = []

    def walk(cmd: click.Command, ctx: click.Context) -> None:
        if ctx.parent is not None:  # the root's help is the page's first section
            out.extend([f"## `{ctx.command_path}`", ""])
        else:
            out.extend(["## `forge`", ""])
        out.extend(["```text", cmd.get_help(ctx).rstrip(), "```", ""])
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, click.Context(sub, info_name=name, parent=ctx,
                                            terminal_width=100, max_content_width=100))

    walk(main, click.Context(main, info_name="forge", terminal_width=100,
                             max_content_width=100))
    return "\n".join(out)


# --- reason codes -----------------------------------------------------------------------------

def _error_classes(tree: ast.Module) -> list[tuple[str, list[str], str | None, str]]:
    """(name, base names, reason, docstring) of each class in a module that sets `reason`
    or derives from a class named like an error."""
    found = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
        reason = None
        for stmt in node.body:
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and stmt.targets[0].id == "reason" and isinstance(stmt.value, ast.Constant)):
                reason = stmt.value.value
        found.append((node.name, bases, reason, ast.get_docstring(node) or ""))
    return found


def reason_codes_markdown(root: Path = ROOT) -> str:
    """The ForgeError subclasses (runner/errors.py first, then the other modules of runner/)
    with their reason and docstring, then every `reason="..."` given where an error is
    raised, with the class and the modules that raise it."""
    modules = sorted((root / "runner").rglob("*.py"))
    trees = {p: ast.parse(p.read_text(), str(p)) for p in modules}
    errors_py = root / "runner" / "errors.py"
    order = [errors_py] + [p for p in modules if p != errors_py]

    known = {"ForgeError"}
    classes: list[tuple[str, str, str | None, str, str]] = []
    changed = True
    seen: set[str] = set()
    while changed:  # subclasses may be declared after, or in another module than, their base
        changed = False
        for path in order:
            for name, bases, reason, doc in _error_classes(trees[path]):
                if name not in seen and (name == "ForgeError" or set(bases) & known):
                    known.add(name)
                    seen.add(name)
                    classes.append((name, bases[0] if bases else "", reason, doc,
                                    str(path.relative_to(root))))
                    changed = True
    reason_of = {name: reason for name, _, reason, _, _ in classes}

    def inherited(name: str) -> str:
        base = {n: b for n, b, _, _, _ in classes}
        while reason_of.get(name) is None and name in base:
            name = base[name]
        return reason_of.get(name) or ""

    out = ["## Error types", "",
           "Each is a `runner.errors.ForgeError`: `reason`, `field`, `fix` and a message.", ""]
    out += _rows(("reason", "error", "base", "module", "what it means"),
                 [(f"`{inherited(name)}`", f"`{name}`", f"`{base}`" if base else "",
                   f"`{module}`", _prose(doc))
                  for name, base, _, doc, module in classes])

    raised: dict[str, dict[str, set[str]]] = {}
    for path in modules:
        for node in ast.walk(trees[path]):
            if not isinstance(node, ast.Call):
                continue
            func = node.func.id if isinstance(node.func, ast.Name) else (
                node.func.attr if isinstance(node.func, ast.Attribute) else "")
            if func not in known:
                continue
            for kw in node.keywords:
                if (kw.arg == "reason" and isinstance(kw.value, ast.Constant)
                        and isinstance(kw.value.value, str)):
                    entry = raised.setdefault(kw.value.value, {"errors": set(), "where": set()})
                    entry["errors"].add(func)
                    entry["where"].add(str(path.relative_to(root)))
    out += ["", "## Reasons given where an error is raised", "",
            "A more precise reason than its type's, set where the error is raised.", ""]
    out += _rows(("reason", "error", "raised in"),
                 [(f"`{reason}`", ", ".join(f"`{e}`" for e in sorted(v["errors"])),
                   ", ".join(f"`{w}`" for w in sorted(v["where"])))
                  for reason, v in sorted(raised.items())])

    handback = root / "runner" / "jobs" / "handback.py"
    fixes = next((ast.literal_eval(node.value) for node in trees.get(handback, ast.Module()).body
                  if isinstance(node, ast.Assign) and len(node.targets) == 1
                  and getattr(node.targets[0], "id", None) == "FIXES"), {})
    if fixes:
        out += ["", "## How a job ended", "",
                "The reason of a `TrainingFailed` or `EvaluationFailed` when the sandbox "
                "stopped the job or the trainer exited with a code of its own "
                "(`trainers/manifest.py`), and the fix it carries (`runner/jobs/handback.py`).",
                ""]
        out += _rows(("reason", "fix"),
                     [(f"`{reason}`", _prose(fix)) for reason, fix in fixes.items()])
    return "\n".join(out) + "\n"


GENERATORS = {"training_keys": training_keys_markdown, "cli": cli_markdown,
              "reason_codes": reason_codes_markdown}


def render(markdown: str) -> str:
    """`markdown` with each marker line replaced by its generator's output."""
    return MARKER.sub(lambda m: GENERATORS[m.group(1)]().rstrip("\n"), markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs hook
    return render(markdown)
