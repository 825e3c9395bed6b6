"""The run manifest: parsing, defaults, and errors that name the offending field."""

import copy

import pytest

from trainers.manifest import ManifestError, parse_manifest, resolve_model
from trainers.scgpt.family import FAMILY as SCGPT
from trainers.scgpt.settings import MODEL_DEFAULTS

GOOD = {
    "manifest_version": 1, "task": "finetune_celltype", "seed": 0, "device": "cpu",
    "vram_cap_gb": 24, "num_threads": None, "output_dir": "/job/out",
    "metrics_path": "/job/out/metrics.jsonl", "experiment_name": "scgpt-cbmc",
    "run_name": "optional", "parent": {"checkpoint_dir": "/job/in/parent"},
    "dataset": {"name": "cbmc", "path": "/job/in/dataset", "format": "cbmc_mat",
                "label_key": None},
    "model": {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_hid": 256, "dropout": 0.1,
              "n_bins": 51, "input_emb_style": "continuous"},
    "training": {"lr": 1e-3, "max_epochs": 10, "batch_size": 64, "precision": "32",
                 "max_seq_len": 257, "mask_ratio": 0.4, "early_stopping_patience": 3,
                 "val_fraction": 0.1, "test_fraction": 0.1, "limit_train_batches": None,
                 "limit_eval_batches": None, "weight_decay": 0.0, "warmup_steps": 0},
}


def _with(path: str, value):
    raw = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


def test_the_issue_example_parses():
    m = parse_manifest(GOOD)
    assert m.task == "finetune_celltype" and m.parent.checkpoint_dir == "/job/in/parent"
    assert m.training.lr == 1e-3 and m.model["d_model"] == 128 and m.dataset.label_key is None
    assert parse_manifest(m.to_dict()) == m  # round trip


def test_minimal_manifest_gets_defaults():
    m = parse_manifest({"task": "pretrain_mgm", "output_dir": "/o",
                        "dataset": {"path": "/d", "format": "cbmc_mat"}})
    assert m.parent is None and m.device == "auto" and m.training.max_seq_len > 1
    assert m.devices == 1 and parse_manifest(_with("devices", 8)).devices == 8
    assert resolve_model(SCGPT, m.model, None) == MODEL_DEFAULTS
    assert m.metrics_path == "/o/metrics.jsonl"  # the stream the host relays


@pytest.mark.parametrize("path,value,field", [
    ("task", "pretrain", "task"),
    ("training.lr", -1, "training.lr"),
    ("training.lr", "fast", "training.lr"),
    ("training.max_epochs", 2.5, "training.max_epochs"),
    ("training.lrr", 1e-3, "training.lrr"),
    ("training.val_fraction", 0.95, "training.test_fraction"),
    ("training.precision", "64", "training.precision"),
    ("training.split_seed", -1, "training.split_seed"),
    ("training.split_seed", "0", "training.split_seed"),
    ("model.n_heads", 5, "model.n_heads"),
    ("model.input_emb_style", "scaling", "model.input_emb_style"),
    ("dataset.format", "loom", "dataset.format"),
    ("dataset.path", KeyError, "dataset.path"),
    ("output_dir", KeyError, "output_dir"),
    ("device", "tpu", "device"),
    ("devices", 0, "devices"),
    ("devices", 65, "devices"),
    ("devices", "2", "devices"),
    ("devices", 1.5, "devices"),
    ("devices", None, "devices"),
    ("manifest_version", 2, "manifest_version"),
    ("parent", "/job/in/parent", "parent"),
    ("dataset", None, "dataset"),
])
def test_errors_name_the_field(path, value, field):
    with pytest.raises(ManifestError) as info:
        parse_manifest(_with(path, value))
    assert info.value.field == field
    assert str(info.value).startswith(f"invalid manifest: {field}: ")


def test_h5ad_finetune_needs_a_label_key():
    raw = _with("dataset.format", "h5ad")
    with pytest.raises(ManifestError, match="dataset.label_key"):
        parse_manifest(raw)


def test_parent_architecture_must_agree():
    parent = {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_hid": 256, "dropout": 0.2,
              "n_bins": 51, "input_emb_style": "continuous"}
    arch = resolve_model(SCGPT, {"d_model": 128, "dropout": 0.0}, parent)
    assert arch["d_model"] == 128 and arch["dropout"] == 0.0  # dropout may be overridden
    assert resolve_model(SCGPT, {}, parent)["dropout"] == 0.2
    with pytest.raises(ManifestError, match=r"model\.d_model: is 256 but the parent"):
        resolve_model(SCGPT, {"d_model": 256}, parent)


# --- one contract: the host's config and dry run are derived from this module ---------------------

def test_the_config_schema_is_derived_from_the_families():
    import dataclasses
    import typing

    from runner.config import compose, schema
    from trainers import family, manifest

    training = typing.get_type_hints(schema.TrainingConf)
    keys, arch = set(manifest.CONFIG_TRAINING_FIELDS), {"artifact_id", "family"}
    for fam in family.all_families():
        spec = typing.get_type_hints(fam.training)
        keys |= set(spec)
        arch |= set(fam.architecture_keys())
        for name, tp in spec.items():  # Optional[the family's type]: None is its default
            inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            assert set(typing.get_args(training[name])) == {inner[0], type(None)}
    assert set(training) == keys
    defaults = {f.name: f.default for f in dataclasses.fields(schema.TrainingConf)}
    assert defaults["warmup_steps"] == "${forge_family:warmup_steps}"  # the family's own
    assert compose.compose_config().training.warmup_steps == 50  # scGPT's, the default parent
    assert family.get("scgpt").defaults("finetune_celltype")["warmup_steps"] == 50
    assert {f.name for f in dataclasses.fields(schema.ParentConf)} == arch


def test_the_manifest_imports_without_torch_or_the_host():
    import subprocess
    import sys

    code = ("import sys, trainers.manifest\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'lightning', 'runner', 'sqlalchemy', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_exit_codes_and_the_primary_metric_are_declared_once():
    from runner import sandbox
    from runner.jobs import handback, launch
    from trainers import entrypoint, manifest

    assert launch.PRIMARY_METRIC is manifest.PRIMARY_METRIC
    assert handback.TRAINER_REASONS is manifest.EXIT_REASONS
    assert sandbox.EXIT_OOM == entrypoint.EXIT_OOM == manifest.EXIT_OOM
    assert set(manifest.PRIMARY_METRIC) == set(manifest.TASKS)


def test_every_preset_composes_to_a_manifest_the_trainer_accepts(tmp_path, monkeypatch):
    from runner.config import compose, options
    from runner.config.manifest import build_manifest
    from trainers import family

    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path))
    parents = {option: compose.to_plain(compose.compose_config([f"parent={option}"]))
               ["parent"]["family"] for option in options.group_options("parent")}
    for training in options.group_options("training"):
        for dataset in options.group_options("dataset"):
            for parent, name in parents.items():
                plain = compose.to_plain(compose.compose_config(
                    [f"training={training}", f"dataset={dataset}", f"parent={parent}"]))
                if plain["training"]["task"] not in family.get(name).tasks:
                    continue  # plan.py refuses it, naming the family's tasks
                from_parent = not plain["training"]["task"].startswith("pretrain_scvi")
                parse_manifest(build_manifest(plain, "run", "cpu", from_parent=from_parent))


@pytest.mark.parametrize("override", ["training.class_weighting=foo",
                                      "training.warmup_steps=-5",
                                      "training.log_every_n_steps=0",
                                      "training.eval_batch_size=0",
                                      "training.limit_eval_batches=-1",
                                      "training.grad_clip=0"])
def test_the_dry_run_refuses_what_the_trainer_would(override, registry_and_code):
    from helpers import count_rows

    from runner import api
    from runner.errors import InvalidOverride

    field = override.split("=")[0]
    for dry_run in (True, False):
        before = count_rows(registry_and_code)
        with pytest.raises(InvalidOverride) as info:
            api.train_model_version(PARENT, DATASET, agent_id="a1", dry_run=dry_run,
                                    overrides=[override])
        assert info.value.field == field and info.value.details["override"] == override
        assert info.value.details["problem"] == "value" and info.value.fix
        after = count_rows(registry_and_code)
        assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == \
            {"tool_calls": 1}  # the audit row; no allocation, no debit


def test_a_registry_architecture_the_trainer_refuses_is_refused_before_any_debit(
        registry_and_code):
    from helpers import count_rows

    from runner import api
    from runner.errors import InvalidConfig
    from runner.registry import catalog, ledger

    catalog.register_model(
        artifact_id="model-two-bins", title="two bins", created_by="test",
        metadata={"family": "scgpt", "framework": "scgpt",
                  "architecture": {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_bins": 2}})
    for dry_run in (True, False):
        before = count_rows(registry_and_code)
        with pytest.raises(InvalidConfig) as info:
            api.train_model_version("model-two-bins", DATASET, agent_id="a1", dry_run=dry_run)
        err = info.value
        assert err.field == "parent.n_bins" and "registry" in str(err) and ">= 3" in err.fix
        after = count_rows(registry_and_code)
        assert {k for k in after if after[k] != before[k]} == {"tool_calls"}
    assert ledger.balance("a1") == 10


PARENT, DATASET = "model-scgpt-cbmc-base", "dataset-geo-GSE100866"  # conftest PILOT_*


@pytest.fixture
def registry_and_code(sqlite_url, tmp_path, monkeypatch):
    """The parent, the dataset, agent a1 with 10 credits and a clean code repository."""
    from helpers import pilot_dry_run_registry

    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "cache"))
    pilot_dry_run_registry(tmp_path, monkeypatch)
    return sqlite_url


# --- the eval gate's manifest -------------------------------------------------------------------

EVAL = {"output_dir": "/job/out", "seed": 3,
        "dataset": {"name": "cbmc", "path": "/job/in/dataset", "format": "cbmc_mat"},
        "split": {"seed": 3, "val_fraction": 0.1, "test_fraction": 0.1, "test_sha256": "a" * 64},
        "models": {"candidate": "/job/in/candidate", "parent": "/job/in/parent"},
        "max_seq_len": 65, "eval_batch_size": 64, "baseline": True}


def test_an_eval_manifest_parses_with_its_models_by_name():
    from trainers.manifest import EVAL_TASK, parse_eval_manifest

    m = parse_eval_manifest(copy.deepcopy(EVAL))
    assert m.task == EVAL_TASK and m.models == EVAL["models"] and m.split.seed == 3
    assert m.baseline is True and m.precision == "auto"


@pytest.mark.parametrize("path, value, field", [
    (("models",), {}, "models"),
    (("models",), {"baseline": "/job/in/x"}, "models"),  # the refitted baseline's name
    (("models",), {"../x": "/job/in/x"}, "models"),
    (("models",), {"candidate": 3}, "models.candidate"),
    (("models",), ["/job/in/x"], "models"),
    (("split", "test_sha256"), "not-a-digest", "split.test_sha256"),
    (("split", "test_fraction"), 0.95, "split.test_fraction"),
    (("task",), "finetune_celltype", "task"),
    (("eval_batch_size",), 0, "eval_batch_size"),
    (("surprise",), 1, "surprise"),
])
def test_an_eval_manifest_names_the_field_it_refuses(path, value, field):
    from trainers.manifest import parse_eval_manifest

    raw = copy.deepcopy(EVAL)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ManifestError) as err:
        parse_eval_manifest(raw)
    assert err.value.field == field
