"""The manual: README.md stays a short manual whose links resolve, the MkDocs site builds
under --strict (a real `mkdocs build`), and its reference pages are generated from the code
(docs/hooks/reference.py): every training key of every family has a described row, or the
build fails."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from runner import errors
from trainers import family as families

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    """docs/hooks/reference.py, loaded by path as MkDocs loads it."""
    spec = importlib.util.spec_from_file_location("docs_hooks_reference",
                                                  ROOT / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_a_short_manual_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+:|#", link)]
    assert relative, "the README links the docs"
    broken = [link for link in relative if not (ROOT / link.split("#")[0]).exists()]
    assert not broken, f"README.md links to missing files: {broken}"
    for needed in ("make install", "source .venv/bin/activate", "make demo", "make test",
                   "demo-agent", "dataset-geo-GSE100866", "model-scvi-cbmc-base"):
        assert needed in text


def test_readme_quickstart_names_ids_the_demo_creates():
    """The quickstart's ids are the demo's own (runner/demo.py and the conf/ option it names)."""
    from runner import demo

    text = (ROOT / "README.md").read_text()
    assert demo.AGENT in text and demo.DATASET in text
    for pilot in demo.PILOTS["full"]:
        assert pilot.base_id in text, pilot.base_id
    option = (ROOT / "conf" / "parent" / "scvi_cbmc_base.yaml").read_text()
    assert "artifact_id: model-scvi-cbmc-base\n" in option  # parent=scvi_cbmc_base names it


def test_every_training_key_of_every_family_has_a_described_row(reference):
    page = reference.training_keys_markdown()
    for fam in families.all_families():
        assert f"## {fam.name}" in page
        for key in fam.training_keys():
            row = re.search(rf"^\| `training\.{key}` \|.*\| ([^|]+) \|$", page, re.MULTILINE)
            assert row and row.group(1).strip(), f"{fam.name}: training.{key}"
        for key in fam.architecture_keys():
            assert re.search(rf"^\| `{key}` \|", page, re.MULTILINE), f"{fam.name}: {key}"
    assert "| `training.max_seq_len` | int | 257 (pretrain_mgm: 129) | >= 2 |" in page
    assert "none \\| balanced \\| sqrt" in page  # choices, escaped inside the table


def _grow(monkeypatch, name: str, part: str, key: str, kind: type, default) -> None:
    """Family `name` declares one more `part` ("training" or "architecture") key."""
    fam = families.get(name)
    extended = dataclasses.make_dataclass(
        "Grown", [(key, kind, dataclasses.field(default=default))], bases=(getattr(fam, part),))
    grown = dataclasses.replace(fam, **{part: extended})
    monkeypatch.setattr(families, "all_families",
                        lambda: [grown if f.name == name else f
                                 for f in [families.get(n) for n in families.FAMILIES]])


def test_a_training_key_without_a_description_fails_the_reference(reference, monkeypatch):
    """A family that declares a new training key and no description for it: the generator
    refuses, naming the key (so `mkdocs build` fails until it is described)."""
    _grow(monkeypatch, "linear", "training", "momentum", float, 0.9)
    with pytest.raises(reference.MissingDescription, match=r"training\.momentum of family linear"):
        reference.training_keys_markdown()
    monkeypatch.setitem(reference.DESCRIPTIONS["linear"], "training.momentum", "Momentum.")
    assert "| `training.momentum` | float | 0.9 |  | Momentum. |" in \
        reference.training_keys_markdown()


def test_an_architecture_key_without_a_description_fails_the_reference(reference, monkeypatch):
    _grow(monkeypatch, "scvi", "architecture", "n_heads", int, None)
    with pytest.raises(reference.MissingDescription, match=r"model\.n_heads of family scvi"):
        reference.training_keys_markdown()


def test_cli_reference_holds_every_command(reference):
    from runner.cli import main

    page = reference.cli_markdown()
    ctx = click.Context(main, info_name="forge")
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        assert f"## `forge {name}`" in page
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                assert f"## `forge {name} {sub}`" in page
    assert "Usage: forge models register [OPTIONS] ARTIFACT_ID ORIGIN_URL" in page


def test_reason_codes_reference_holds_every_error(reference):
    page = reference.reason_codes_markdown()
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.ForgeError):
            assert f"| `{value.reason}` | `{value.__name__}` |" in page, value.__name__
    assert "| `nan_metrics` |" in page  # a reason given where the error is raised


def test_mkdocs_build_strict(tmp_path):
    """The real build: strict (a broken link or anchor fails), the reference pages filled."""
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1",
                              "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    keys = (site / "reference" / "training-keys" / "index.html").read_text()
    assert "training.max_seq_len" in keys and "generated:" not in keys
    assert "Usage: forge models" in (site / "reference" / "cli" / "index.html").read_text()
    assert "insufficient_balance" in (site / "reference" / "reason-codes" / "index.html"
                                      ).read_text()
    assert not (site / "hooks").exists()  # the generator is not published
