"""The trust boundary at the front doors: a caller sets only what the allowlist allows.

Each attack of issue 11 (callbacks, hydra.*, env passthrough, escaped interpolation,
operator settings, oversized input) is tried through every front door: train_model_version
(dry run, and a real call, which must be refused before any debit or row), forge-train
(`runner.train_app.run`, with and without -m) and the skill's input_schema (jsonschema).
A canary secret sits in the environment throughout; it must never come back.
"""

from __future__ import annotations

import json
import pickle
import string

import jsonschema
import pytest
from helpers import PILOT_DATASET, PILOT_PARENT, count_rows, pilot_dry_run_registry
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runner import api, tools, train_app
from runner.config import compose
from runner.config.options import launcher_options
from runner.config.overrides import _parse_one
from runner.config.schema import training_keys
from runner.errors import InvalidOverride
from runner.registry import ledger

PARENT, DATASET = PILOT_PARENT, PILOT_DATASET
CANARY = "canary-5e1f0c9d"
CLI = ["parent=scgpt_cbmc_base", "dataset=cbmc", "agent_id=a1"]


@pytest.fixture(autouse=True)
def canary(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("FORGE_CANARY_SECRET", CANARY)
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path_factory.mktemp("compose-cache")))


@pytest.fixture
def registry(sqlite_url, tmp_path, monkeypatch):
    """Parent, dataset, agent a1 with 10 credits, and a clean code repository to pin."""
    pilot_dry_run_registry(tmp_path, monkeypatch)
    return sqlite_url


def refused(problem: str | tuple = "operator_only", **kw) -> InvalidOverride:
    """A dry run with `kw` raises InvalidOverride with `problem`, and leaks no secret."""
    kw.setdefault("agent_id", "a1")
    with pytest.raises(InvalidOverride) as info:
        api.train_model_version(PARENT, DATASET, dry_run=True, **kw)
    err = info.value
    assert CANARY not in json.dumps(tools.jsonable(err.to_dict()))
    problems = problem if isinstance(problem, tuple) else (problem,)
    assert err.details.get("problem") in problems, err.to_dict()
    return err


def refused_for_real(url: str, **kw) -> InvalidOverride:
    """A real call with `kw` is refused before anything moves: only its audit row is new."""
    before = count_rows(url)
    with pytest.raises(InvalidOverride) as info:
        api.train_model_version(PARENT, DATASET, agent_id="a1", **kw)
    after = count_rows(url)
    assert {k: v for k, v in after.items() if k != "tool_calls"} == \
        {k: v for k, v in before.items() if k != "tool_calls"}
    assert after["tool_calls"] == before["tool_calls"] + 1
    assert ledger.balance("a1") == 10
    return info.value


def forge_train(capsys, *argv: str) -> tuple[int, str, str]:
    code = train_app.run(list(argv))
    out = capsys.readouterr()
    assert CANARY not in out.out + out.err
    return code, out.out, out.err


def cli_refused(capsys, *argv: str, says: str = "operator setting") -> str:
    code, _out, err = forge_train(capsys, *argv)
    assert code == train_app.EXIT_INVALID, err
    assert "error: InvalidOverride: " in err and says in err, err
    return err


def skill_errors(**request) -> list[str]:
    schema = api.TRAIN_SKILL.input_schema
    request = {"parent_artifact_id": PARENT, "dataset_artifact_id": DATASET,
               "agent_id": "a1", **request}
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(request)]


# --- 1. Hydra callbacks: code on the host ---------------------------------------------------------

def callback(marker) -> list[str]:
    """A callback that would create `marker`: open(file=marker, mode='w') at app start."""
    return ["+hydra.callbacks.pwn._target_=builtins.open", f"+hydra.callbacks.pwn.file={marker}",
            "+hydra.callbacks.pwn.mode=w"]


def test_callback_override_is_refused_by_forge_train(registry, tmp_path, capsys):
    marker = tmp_path / "pwned"
    before = count_rows(registry)
    cli_refused(capsys, *CLI, *callback(marker), says="only the operator")
    assert not marker.exists()
    assert count_rows(registry) == before


def test_callback_override_is_refused_by_forge_train_multirun(registry, tmp_path, capsys):
    marker = tmp_path / "pwned"
    cli_refused(capsys, "-m", *CLI, "dry_run=true", "training.lr=1e-3,1e-4",
                *callback(marker), says="only the operator")
    assert not marker.exists()


def test_callback_override_is_refused_by_the_api(registry, tmp_path):
    marker = tmp_path / "pwned"
    refused(overrides=callback(marker))
    refused_for_real(registry, overrides=callback(marker))
    refused(training_config={"hydra": {"callbacks": {"pwn": {"_target_": "builtins.open",
                                                              "file": str(marker)}}}})
    assert not marker.exists()


def test_callback_override_fails_the_skill_schema(tmp_path):
    assert skill_errors(overrides=callback(tmp_path / "pwned"))
    assert skill_errors(training_config={"hydra": {"callbacks": {}}})


HYDRA_SETTINGS = [
    "hydra.run.dir=/tmp/forge-elsewhere", "hydra.sweep.dir=/tmp/forge-elsewhere",
    "hydra.job.env_set.LD_PRELOAD=/tmp/x.so", "hydra/job_logging=disabled",
    "hydra/hydra_logging=disabled", "hydra.job.chdir=true", "hydra.verbose=true",
    "hydra.output_subdir=null", "hydra/sweeper=optuna", "hydra.launcher.timeout_min=1",
    "hydra.sweeper.params.training.lr=1e-3,1e-4", "hydra.callbacks.forge_sweep.fit_budget=true",
]


@pytest.mark.parametrize("line", HYDRA_SETTINGS)
def test_hydra_settings_are_refused_at_every_door(registry, capsys, line):
    refused(overrides=[line])
    cli_refused(capsys, *CLI, "dry_run=true", line)
    cli_refused(capsys, "-m", *CLI, "dry_run=true", line)
    assert skill_errors(overrides=[line])


@pytest.mark.parametrize("flag", [["--config-dir", "/tmp"], ["--config-path", "/tmp"],
                                  ["--config-name", "other"]])
def test_hydra_flags_that_read_other_configs_are_refused(registry, capsys, flag):
    cli_refused(capsys, *flag, *CLI, "dry_run=true", says="operator sets FORGE_CONFIG_DIR")


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):  # unpickling creates the file: what a rerun pickle could run
        return (open, (self.path, "w"))


def test_experimental_rerun_never_unpickles_a_callers_file(registry, tmp_path, capsys):
    marker, pkl = tmp_path / "pwned", tmp_path / "config.pickle"
    pkl.write_bytes(pickle.dumps(_Marker(marker)))
    cli_refused(capsys, "--experimental-rerun", str(pkl), says="operator sets FORGE_CONFIG_DIR")
    assert not marker.exists()


def test_a_launcher_is_a_choice_among_the_installed_ones(registry, capsys):
    assert {"basic", "submitit_local", "submitit_slurm", "forge_slurm"} <= \
        set(launcher_options())
    cli_refused(capsys, "-m", *CLI, "dry_run=true", "hydra/launcher=nope",
                says="is not an option")
    refused(overrides=["hydra/launcher=submitit_local"])  # one call runs one job


# --- 2. host environment into the jail, and interpolation in any spelling -------------------------

def test_env_allowlist_is_operator_only(registry, capsys):
    line = "sandbox.env_allowlist=[FORGE_CANARY_SECRET,HOME]"
    refused(overrides=[line])
    refused_for_real(registry, overrides=[line])
    refused(training_config={"sandbox": {"env_allowlist": ["FORGE_CANARY_SECRET"]}})
    cli_refused(capsys, *CLI, "dry_run=true", line)
    cli_refused(capsys, "-m", *CLI, "dry_run=true", line)
    assert skill_errors(overrides=[line])


# Spellings of ${oc.env:FORGE_CANARY_SECRET} that got past the old `${` filter: resolved (and
# the secret returned), taken as a literal, or a parse error; all are refused as interpolation.
SECRET = "oc.env:FORGE_CANARY_SECRET"
ESCAPED = [
    f"\\\\${{{SECRET}}}",          # \\${...}: an escaped backslash, then a live interpolation
    f"'\\\\${{{SECRET}}}'",        # the same, quoted
    f"\\\\\\\\${{{SECRET}}}",      # two escaped backslashes, then a live one
    f"$\\{{{SECRET}}}",            # $\{...}: Hydra unescapes \{ to {
    f"\\${{{SECRET}}}",            # \${...}: escaped; refused too, callers never need it
    f"a\\\\${{{SECRET}}}b",
]
PLAIN = [f"${{{SECRET}}}", f"'${{{SECRET}}}'", f"x${{{SECRET}}}y",
         f"${{oc.decode:'${{{SECRET}}}'}}"]


@pytest.mark.parametrize("value", ESCAPED)
def test_interpolation_in_any_spelling_is_refused_by_the_api(registry, value):
    refused("interpolation", overrides=[f"training.precision={value}"])
    refused("interpolation", training_config={"training": {"precision": value}})
    refused("interpolation", training_config={"precision": value})  # the flat form
    refused("interpolation", training_config={"training": {value: "auto"}})
    refused_for_real(registry, overrides=[f"training.precision={value}"])


@pytest.mark.parametrize("value", PLAIN)
def test_plain_interpolation_stays_refused(registry, capsys, value):
    """A regression guard: the old filter refused these too."""
    refused(("interpolation", "syntax"), overrides=[f"training.precision={value}"])
    refused("interpolation", training_config={"training": {"precision": value}})
    cli_refused(capsys, *CLI, "dry_run=true", f"training.precision={value}", says="")
    assert skill_errors(overrides=[f"training.precision={value}"])


def test_an_escaped_backslash_before_an_interpolation_never_resolves(registry):
    """The issue's example: `\\\\${oc.env:NAME}` passed the old filter and came back."""
    refused("interpolation", training_config={"training": {"precision": f"\\\\${{{SECRET}}}"}})
    refused("interpolation", overrides=[f"training.precision='\\\\${{{SECRET}}}'"])


@pytest.mark.parametrize("value", ESCAPED)
def test_interpolation_in_any_spelling_is_refused_by_forge_train(registry, capsys, value):
    cli_refused(capsys, *CLI, "dry_run=true", f"training.precision={value}",
                says="interpolation")
    cli_refused(capsys, "-m", *CLI, "dry_run=true", f"training.precision=auto,{value}",
                says="interpolation")


@pytest.mark.parametrize("value", ESCAPED)
def test_interpolation_in_any_spelling_fails_the_skill_schema(value):
    assert skill_errors(overrides=[f"training.precision={value}"])


@pytest.mark.parametrize("line,problem", [
    (f"training.precision=choice(auto,'\\\\${{{SECRET}}}')", "interpolation"),
    (f"training=glob(*,exclude='\\\\${{{SECRET}}}')", "interpolation"),
    ("pricing.price_per_hour=choice(0,0.5)", "operator_only"),
    ("pricing.price_per_hour=range(0,1)", "operator_only"),
    ("policy.max_devices=interval(8,64)", "operator_only"),
    ("sandbox.env_allowlist=glob(*)", "operator_only"),
    ("hydra/launcher=glob(*)", "operator_only"),  # -m may; train_model_version runs one job
])
def test_sweep_syntaxes_are_checked_like_any_value(registry, capsys, line, problem):
    refused(problem, overrides=[line])
    if not line.startswith("hydra/launcher"):
        cli_refused(capsys, "-m", *CLI, "dry_run=true", line,
                    says="interpolation" if problem == "interpolation" else "operator")


# --- 3. free compute, no policy, other databases, other lineages ----------------------------------

OPERATOR_SETTINGS = [
    "pricing.price_per_hour=0", "pricing.per_device.cpu=0", "pricing.currency=free",
    "pricing=default", "policy.max_wall_time_cap_min=100000", "policy.max_vram_gb=100000",
    "policy.max_devices=64", "sandbox.max_processes=100000", "sandbox.tmp_size_gb=1000",
    "sandbox.grace_s=3600", "sandbox.backend=none", "sandbox=bwrap",
    "registry.db_url=sqlite:////tmp/other.db", "registry.blob_threshold_mb=0",
    "tracking.tracking_uri=http://attacker.example", "tracking.artifact_root=/",
    "tracking.experiment_name=other", "tracking=local", "parent.family=scgpt-other-lineage",
    "parent.n_layers=12", "parent.n_bins=2", "parent.input_emb_style=continuous",
    "dataset.source=pbmc68k_reduced", "dataset.format=h5ad", "dataset.label_key=x",
    "local=default",
]


@pytest.mark.parametrize("line", OPERATOR_SETTINGS)
def test_operator_settings_are_refused_by_the_api(registry, line):
    err = refused(overrides=[line])
    assert err.field == line.split("=", 1)[0]  # the error names the key


@pytest.mark.parametrize("line", ["pricing.price_per_hour=0", "policy.max_devices=64",
                                  "sandbox.grace_s=3600", "registry.db_url=sqlite:////tmp/x.db",
                                  "parent.family=other"])
def test_operator_settings_refuse_a_real_call_before_any_debit(registry, line):
    refused_for_real(registry, overrides=[line])


@pytest.mark.parametrize("data", [
    {"pricing": {"price_per_hour": 0}}, {"policy": {"max_devices": 64}},
    {"sandbox": {"grace_s": 3600}}, {"registry": {"db_url": "sqlite:////tmp/x.db"}},
    {"tracking": {"experiment_name": "x"}}, {"parent": {"family": "other"}},
    {"dataset": {"source": "pbmc68k_reduced"}},
])
def test_operator_settings_are_refused_in_training_config(registry, data):
    refused(training_config=data)
    refused_for_real(registry, training_config=data)


@pytest.mark.parametrize("line", OPERATOR_SETTINGS)
def test_operator_settings_are_refused_by_forge_train(registry, capsys, line):
    cli_refused(capsys, *CLI, "dry_run=true", line)


@pytest.mark.parametrize("line", ["pricing.price_per_hour=0,0.5", "policy.max_devices=64",
                                  "parent.family=a,b", "registry.db_url=sqlite:////tmp/x.db"])
def test_operator_settings_are_refused_by_forge_train_multirun(registry, capsys, line):
    before = count_rows(registry)
    cli_refused(capsys, "-m", *CLI, line)
    assert count_rows(registry) == before


@pytest.mark.parametrize("line", OPERATOR_SETTINGS)
def test_operator_settings_fail_the_skill_schema(line):
    assert skill_errors(overrides=[line])


@pytest.mark.parametrize("line,problem", [
    ("+training.extra=1", "operator_only"), ("++training.lr=1", "operator_only"),
    ("~training.lr", "operator_only"), ("+sandbox.env_allowlist=[HOME]", "operator_only"),
    ("training@hydra.callbacks=finetune_celltype", "operator_only"),
    ("agent_id=someone-else", "argument"), ("parent.artifact_id=model-other", "argument"),
    ("dataset=pbmc68k_reduced", "argument"), ("sweep=tiny_grid", "sweep"),
])
def test_additions_deletions_and_arguments_are_refused_by_the_api(registry, line, problem):
    refused(problem, overrides=[line])
    assert skill_errors(overrides=[line])


def test_forge_train_names_artifacts_by_id_never_by_parent_fields(registry, capsys):
    cli_refused(capsys, *CLI, "dry_run=true", f"parent.artifact_id={PARENT}",
                says="parent_artifact_id=ID")
    cli_refused(capsys, "parent=scgpt_cbmc_base", "parent_artifact_id=model-other",
                "agent_id=a1", "dry_run=true", says="does not describe")
    code, out, err = forge_train(capsys, f"parent_artifact_id={PARENT}",
                                 f"dataset_artifact_id={DATASET}", "agent_id=a1",
                                 "dry_run=true")
    assert code in (train_app.EXIT_OK, train_app.EXIT_WOULD_NOT_LAUNCH), err
    config = json.loads(out)["config"]
    assert config["parent"]["artifact_id"] == PARENT and config["dataset"]["source"] == "cbmc"


def test_a_passed_config_must_carry_the_operators_settings(registry):
    """forge-train hands train_model_version a composed `config`; one a caller composed
    with other operator settings is refused the same way."""
    cfg = compose.compose_config(["pricing.price_per_hour=0", "agent_id=a1", "dry_run=true"])
    with pytest.raises(InvalidOverride) as info:
        api.train_model_version(PARENT, DATASET, agent_id="a1", dry_run=True, config=cfg)
    assert info.value.details["problem"] == "operator_only"
    assert info.value.field == "pricing.price_per_hour"


# --- 4. what the skill publishes -----------------------------------------------------------------

def test_the_skill_schema_publishes_the_allowlist():
    schema = api.TRAIN_SKILL.input_schema["properties"]
    nested = [s for s in schema["training_config"]["anyOf"]
              if "training" in s.get("properties", {})][0]
    training = nested["properties"]["training"]
    assert nested["additionalProperties"] is False and training["additionalProperties"] is False
    assert set(training["properties"]) == set(training_keys())
    assert training["properties"]["lr"]["type"] == "number"
    for word in ("pricing", "policy", "sandbox", "registry", "tracking", "hydra"):
        assert word in schema["overrides"]["description"]
    assert not skill_errors(overrides=["training=pretrain_mgm", "training.lr=1e-4"],
                            training_config={"training": {"lr": 1e-4, "max_epochs": 2}})
    assert not skill_errors(training_config={"lr": 1e-4})
    assert skill_errors(training_config={"training": {"lr": "fast"}})
    assert skill_errors(training_config={"training": {"lrr": 1}})


# --- 5. caps: oversized input is a reason-coded refusal, never a RecursionError -------------------

def deep(levels: int) -> dict:
    node: dict = {"lr": 1e-4}
    for _ in range(levels):
        node = {"training": node}
    return node


@pytest.mark.parametrize("kw,problem", [
    (dict(overrides=["training.lr=1e-4"] * 257), "too_many"),
    (dict(overrides=["training.task=" + "x" * 5000]), "too_long"),
    (dict(overrides=["training.lr=" + "[" * 1500 + "]" * 1500]), "too_deep"),
    (dict(training_config=deep(5000)), "too_deep"),
    (dict(training_config={"training": {f"k{i}": i for i in range(1001)}}), "too_many"),
    (dict(training_config={"training": {"task": "x" * 5000}}), "too_long"),
])
def test_oversized_input_is_refused_with_a_reason(registry, capsys, kw, problem):
    err = refused(problem, **kw)
    assert err.fix
    if "overrides" in kw:
        cli_refused(capsys, *CLI, "dry_run=true", *kw["overrides"], says="")


# --- property tests: escapes either refused or literal, and never resolved ------------------------

PIECES = st.sampled_from(["$", "{", "}", "\\", "\\\\", "${", "\\${", "$\\{", "'", "oc.env:",
                          "FORGE_CANARY_SECRET", "oc.decode:", ":", "a", " "])
SPELLINGS = st.lists(PIECES, min_size=1, max_size=8).map("".join) | \
    st.text(alphabet=string.printable, max_size=16)


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SPELLINGS)
@example(f"\\\\${{{SECRET}}}")
@example(f"$\\{{{SECRET}}}")
@pytest.mark.slow
def test_an_override_value_is_refused_or_reaches_the_config_literally(value):
    line = f"dataset.label_key={_quoted(value)}"
    try:
        cfg = compose.compose_config([line])
    except InvalidOverride as err:
        assert CANARY not in str(err.to_dict())
        return
    plain = compose.to_plain(cfg)
    assert plain["dataset"]["label_key"] == _parse_one(line).value()
    assert CANARY not in json.dumps(plain)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(SPELLINGS)
@example(f"\\\\${{{SECRET}}}")
@example(f"\\\\\\\\${{{SECRET}}}")
def test_a_training_config_value_never_resolves_an_env_var(registry, value):
    for data in ({"training": {"precision": value}}, {"training": {value: "auto"}}):
        try:
            result = api.train_model_version(PARENT, DATASET, data, agent_id="a1", dry_run=True)
        except InvalidOverride as err:
            assert CANARY not in json.dumps(tools.jsonable(err.to_dict()))
            continue
        assert CANARY not in json.dumps(tools.jsonable(result))
        assert result["config"]["training"]["precision"] == value  # literal, when accepted
