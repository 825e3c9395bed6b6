"""The host's MLflow side of a job: the host owns the run; the sandbox's metrics are relayed in.

The trainer appends metric points as JSON lines to one file, `/job/out/metrics.jsonl`
(trainers/metrics_log.py). `MetricRelay` reads what is new in that file every couple of
seconds while the job runs, and once more when it ends, and logs it to the host run. The
file is the job's: it is opened without following links or blocking, read within caps, and
checked point by point; no MLflow client ever reads a tree the job wrote. mlflow is imported
here only, and only when a real launch needs it: the dry run never loads it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import posixpath
import re
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from runner import settings
from runner.errors import ForgeError, StoreHalfMigrated
from runner.jobs.handback import NotPlainFile, read_job_file
from runner.registry import db  # the only code that talks SQL (the store's schema, here)
from runner.sandbox import printable  # stdlib only: no torch, no mlflow
from trainers import family as families

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in job logs

MAX_PARAM_VALUE = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


class TrackingUnavailable(ForgeError):
    reason = "tracking_unavailable"


def client(tracking_uri: str):
    """A client of one store: runs, models and the model registry all in `tracking_uri`,
    created and migrated first if it is new (`prepare_store`)."""
    from mlflow.tracking import MlflowClient

    prepare_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


_READY: set[str] = set()  # stores this process has opened whole: no lock needed again


def prepare_store(tracking_uri: str) -> None:
    """Create and migrate the store behind `tracking_uri` once, under an inter-process lock,
    before a job uses it.

    MLflow creates and migrates a database store when a client first opens it, with no lock
    of its own: the first jobs on a fresh FORGE_HOME raced through its migrations (`table
    latest_metrics already exists`) and could leave it half-migrated. Here the first open in
    each process takes a file lock under FORGE_HOME/locks, so one process migrates and the
    others find the store whole. A store that still fails to open under the lock is broken,
    not busy: StoreHalfMigrated (with its fix), else TrackingUnavailable. A tracking server
    migrates its own store.

    A store this host has opened whole before, with the MLflow installed now, and still at
    the migration it was then (the note beside the lock says which) is ready without
    importing mlflow: a submit, which only checks the store before its debit, saves mlflow's
    import and the store's open (2.8 s on a 2-core host; benchmarks/README.md)."""
    if is_server(tracking_uri) or tracking_uri in _READY:
        return
    locks = settings.forge_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    opened = locks / f"mlflow-{name}.opened"
    if not _opened_as_now(tracking_uri, opened):
        with open(locks / f"mlflow-{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            if not _opened_as_now(tracking_uri, opened):  # not by another while we waited
                _open_whole(tracking_uri)
                _note_opened(tracking_uri, opened)
    _READY.add(tracking_uri)


def _open_whole(tracking_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    try:  # the tracking store opens in the constructor; the model registry on first use
        MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri) \
            .search_registered_models(max_results=1)
    except Exception as exc:
        raise _store_problem(tracking_uri, exc) from exc


def _store_as_now(tracking_uri: str) -> dict:
    """The installed MLflow's version and the store's migration record: what a store opened
    whole once must still show to count as ready (MLflow itself opens only a store at its own
    head revision)."""
    return {"mlflow": importlib.metadata.version("mlflow"),
            "revision": db.store_revision(tracking_uri)}


def _opened_as_now(tracking_uri: str, note: Path) -> bool:
    try:
        seen = json.loads(note.read_text())
    except (OSError, ValueError):
        return False
    now = _store_as_now(tracking_uri)
    return now["revision"] is not None and seen == now


def _note_opened(tracking_uri: str, note: Path) -> None:
    tmp = note.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_store_as_now(tracking_uri)))
    tmp.replace(note)


# What MLflow (and Alembic under it) says of a store whose migrations stopped half-way.
_HALF_MIGRATED = ("out-of-date database schema", "already exists", "duplicate column",
                  "no such table", "expected to match one row")


def _store_problem(tracking_uri: str, exc: Exception) -> ForgeError:
    """Why a store could not be opened under the lock: half-migrated, or unreachable."""
    text = str(exc)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    tables, revision = db.migration_state(tracking_uri)
    if (tables and revision is None) or any(s in text for s in _HALF_MIGRATED):
        where = tracking_uri.removeprefix("sqlite:///")  # the file, for a local store
        return StoreHalfMigrated(
            f"the MLflow tracking store {where} is half-migrated: {len(tables) or 'its'} "
            f"tables, migration record {revision or 'missing'} ({first})",
            field="tracking.tracking_uri",
            fix=f"stop the jobs that use it and back it up; run `mlflow db upgrade "
                f"{tracking_uri}` to finish its migration; if that fails too, move it aside "
                f"(mv {where} {where}.broken) and the next job creates a new store (the old "
                "runs stay in the moved file)")
    return TrackingUnavailable(f"cannot open the MLflow tracking store {tracking_uri}: {first}",
                               field="tracking.tracking_uri",
                               fix="check the tracking store the operator configured "
                                   "(conf/tracking/, conf/local/), then retry")


def is_server(tracking_uri: str) -> bool:
    """A tracking server (`tracking=server`, deploy/mlflow/up.sh) rather than a store this
    host opens itself (`tracking=local`: sqlite). A server keeps the artifacts too: clients
    upload and download them through it (`mlflow-artifacts:`), never to a path of their own."""
    return urlsplit(tracking_uri).scheme in ("http", "https")


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> flat `a.b.c` params, values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM_VALUE]
    return out


# MLflow's UI opens an experiment on its GenAI overview unless the experiment says it holds
# model training (the UI reads this tag; MLflow's own client never sets it for us).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (Markdown)
# MLflow 3.17's UI no longer reads that tag to pick an experiment's first page: a switch
# (GenAI | Model training) kept in the URL or in the browser decides, GenAI by default. Every
# UI route forge writes names the training workflow, so it opens on runs, not on traces.
UI_WORKFLOW = "?workflowType=machine_learning"


def experiment_route(exp_id: str) -> str:
    """The experiment's page in the MLflow UI (relative: `#/...`), on its training runs."""
    return f"#/experiments/{quote(str(exp_id), safe='')}{UI_WORKFLOW}"


def experiment_id(mlflow_client, name: str, artifact_root: Path) -> str:
    """The experiment `name`, created when missing: in a local store its artifacts go under
    `artifact_root/name`; a tracking server picks their location itself (`artifact_root` is
    not used), so the host's own paths never reach a shared server. Either way it is marked a
    model-training experiment (EXPERIMENT_KIND), an older one the first time it is used again;
    a kind someone set by hand is left as it is."""
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
        if EXPERIMENT_KIND_TAG not in existing.tags:
            try:
                mlflow_client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG,
                                                 EXPERIMENT_KIND)
            except Exception as exc:  # noqa: BLE001 - how the UI opens it: never worth a job
                print(f"warning: could not mark experiment {name!r} as model training: "
                      f"{type(exc).__name__}: {exc}"[:300], file=sys.stderr)
        return existing.experiment_id
    kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    try:
        if is_server(mlflow_client.tracking_uri):
            return mlflow_client.create_experiment(name, tags=kind)
        # FORGE_HOME defaults to ./outputs: a relative root is the cwd's, as for the registry
        location = (Path(artifact_root).resolve() / name).as_uri()
        return mlflow_client.create_experiment(name, artifact_location=location, tags=kind)
    except Exception:  # created concurrently by another job
        existing = mlflow_client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


# --- what a reviewer reads: descriptions and links in the MLflow UI --------------------------

def ui_routes(model: dict | None, tracking_uri: str) -> dict[str, str]:
    """The MLflow UI's routes of a registry version (catalog.get_model_version) tracked in the
    store `tracking_uri`: `version` (#/models/NAME/versions/N) and `run`
    (#/experiments/E/runs/R), each with UI_WORKFLOW, relative to the UI, so a description
    links them in whichever server shows it. Empty for a version tracked in another store, or
    in none."""
    if model is None:
        return {}
    recorded = (model.get("metadata") or {}).get("mlflow") or {}
    if recorded.get("tracking_uri") != tracking_uri:
        return {}
    version = model.get("version") or {}
    routes = {}
    name, _, number = (version.get("mlflow_model_uri") or "").removeprefix(
        "models:/").partition("/")
    if name and number:
        routes["version"] = f"#/models/{quote(name, safe='')}/versions/" \
                            f"{quote(number, safe='')}{UI_WORKFLOW}"
    run_id, exp_id = version.get("mlflow_run_id"), recorded.get("experiment_id")
    if run_id and exp_id is not None:
        routes["run"] = f"#/experiments/{quote(str(exp_id), safe='')}/runs/" \
                        f"{quote(run_id, safe='')}{UI_WORKFLOW}"
    return routes


def describe(*, artifact_id: str, version_number: int, family: str, task: str,
             dataset_id: str, parent: dict | None, tracking_uri: str,
             metric: str | None = None, value: float | None = None,
             test_cells: int | None = None) -> str:
    """What a version is, in one Markdown paragraph for the MLflow UI (its run's note, the
    head of its registered version's description): family, task, parent (linked to the
    parent's registered version and run where they are in this store), dataset and, once
    measured, the host's primary metric."""
    if parent is None:
        lineage = "trained from scratch"
    else:
        routes = ui_routes(parent, tracking_uri)
        head = f"{parent['id']} v{parent['version_number']}"
        head = f"[{head}]({routes['version']})" if "version" in routes else f"`{head}`"
        run = f" (its [training run]({routes['run']}))" if "run" in routes else \
            " (not tracked in this MLflow store)"
        lineage = f"fine-tuned from {head}{run}"
    text = (f"**{artifact_id}** (registry v{version_number}): a `{family}` model, task "
            f"`{task}`, {lineage}, on dataset `{dataset_id}`.")
    if metric and isinstance(value, (int, float)) and math.isfinite(value):
        cells = f" on all {test_cells} held-out cells" if test_cells else ""
        text += f" Host-measured {metric}: {value:.4f}{cells}."
    return text


def describe_run(mlflow_client, run_id: str, text: str) -> None:
    """The run's description (its note, shown above the run's details)."""
    mlflow_client.set_tag(run_id, NOTE_TAG, text)


def family_description(family: str) -> str:
    """The registered model's description: one registered model per family."""
    return (f"Every `{family}` model version that forge-runner trained and registered. Each "
            "version's description says what it is (task, parent, dataset, the host's "
            "measured metric) and links its parent; the tags `forge.artifact_id` and "
            "`forge.version_number` name it in the forge registry, `forge.lifecycle_state` "
            "and the `champion` alias say what the eval gate decided.")


def open_run(mlflow_client, *, experiment: str, artifact_root: Path, run_name: str,
             tags: dict[str, str], params: dict[str, str], config_yaml: str,
             parent_run_id: str | None = None, note: str | None = None) -> tuple[str, str]:
    """Create the host run with tags, flattened params, the resolved config artifact and its
    description (`note`, Markdown: describe())."""
    from mlflow.entities import Param

    exp_id = experiment_id(mlflow_client, experiment, artifact_root)
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    if note:
        tags = {**tags, NOTE_TAG: note}
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=items[i:i + PARAMS_PER_BATCH])
    mlflow_client.log_text(run_id, config_yaml, "config/resolved.yaml")
    mlflow_client.set_tag(run_id, "forge.config", "config/resolved.yaml")
    return exp_id, run_id


# MLflow's rule for metric names (mlflow.utils.validation), in ASCII: letters, digits,
# _ - . space : / ; at most 250 characters; no path that normalises to another name.
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_\-. :/]{1,250}$")


def valid_metric_name(name) -> bool:
    if not isinstance(name, str) or not _METRIC_NAME.match(name):
        return False
    norm = posixpath.normpath(name)
    return norm == name and norm != "." and not norm.startswith(("..", "/"))


class MetricRelay:
    """Relays the job's metrics stream (JSON lines `{"key", "value", "step", "ts"}`) into
    the host run, incrementally from the last offset.

    The file is untrusted: it is opened O_RDONLY|O_NOFOLLOW|O_NONBLOCK and must be a regular
    file by fstat (a link, FIFO or device is ignored with a warning, so the relay neither
    follows nor blocks); at most `max_bytes` are read and `max_points` relayed; a point with
    an invalid name, a non-finite or non-numeric value, or a malformed line is skipped with a
    warning. Warnings go to `warn` (default: stderr), the first `MAX_WARNINGS` one by one."""

    MAX_WARNINGS = 20
    MAX_LINE = 64 * 1024

    def __init__(self, host_client, host_run_id: str, metrics_path: Path, interval_s: float = 2.0,
                 *, max_bytes: int = 64 * 1024**2, max_points: int = 200_000, warn=None,
                 host_measured: tuple[str, ...] = ()):
        self.host = host_client
        self.host_measured = host_measured  # key prefixes the host logs itself: not relayed
        self.run_id = host_run_id
        self.path = Path(metrics_path)
        self.interval_s = interval_s
        self.max_bytes, self.max_points = max_bytes, max_points
        self.warn_line = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.offset = 0  # bytes of the file consumed so far
        self.pending = b""  # a last line without its newline yet
        self._relayed = 0
        self.skipped = 0
        self.warnings = 0
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metric-relay", daemon=True)

    def __enter__(self) -> MetricRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.sync(final=True)  # everything, once the job has ended
        except Exception as exc:  # noqa: BLE001 -- eval metrics come from result.json
            self._warn(f"last relay pass failed: {type(exc).__name__}: {exc}"[:300])
        if self.skipped:
            self._warn(f"{self.skipped} metric point(s) skipped in total", once="total")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 -- the host store may be busy: next pass
                self._warn(f"relay pass failed: {type(exc).__name__}: {exc}"[:300], once="pass")

    def _warn(self, message: str, once: str | None = None) -> None:
        if once is not None:
            if once in self._warned:
                return
            self._warned.add(once)
        self.warnings += 1
        if self.warnings <= self.MAX_WARNINGS:
            self.warn_line(f"[metrics] {printable(message)}")
        elif self.warnings == self.MAX_WARNINGS + 1:
            self.warn_line("[metrics] more warnings suppressed")

    def _read_new(self) -> bytes:
        """New bytes of the stream, within the byte cap; b"" if there is nothing safe to read."""
        budget = max(0, self.max_bytes - self.offset)
        try:
            data, size = read_job_file(self.path, offset=self.offset, limit=budget)
        except FileNotFoundError:
            return b""
        except NotPlainFile as exc:
            self._warn(f"{self.path.name} {exc}; only a regular file is relayed, never a link "
                       "or a FIFO", once="open")
            return b""
        self.offset += len(data)
        if size > self.offset and self.offset >= self.max_bytes:
            self._warn(f"{self.path.name} is over {self.max_bytes} bytes: the rest is not "
                       "relayed", once="bytes")
        return data

    def _points(self, data: bytes, final: bool) -> list:
        from mlflow.entities import Metric

        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        if final and self.pending:
            lines.append(self.pending)
            self.pending = b""
        if len(self.pending) > self.MAX_LINE:  # a line that never ends: drop it
            self.pending = b""
            lines.append(b"")
            self._warn(f"a line over {self.MAX_LINE} bytes skipped", once="line")
        points = []
        for raw in lines:
            point = self._parse(raw)
            if point is None:
                self.skipped += 1
                continue
            if point[0].startswith(self.host_measured):  # a claim: the host measures it
                continue
            if self._relayed + len(points) >= self.max_points:
                self._warn(f"over {self.max_points} metric points: the rest is not relayed",
                           once="points")
                break
            points.append(Metric(*point))
        return points

    def _parse(self, raw: bytes) -> tuple[str, float, int, int] | None:
        """(key, value, timestamp ms, step) of one line, or None (with a warning)."""
        if not raw.strip() or len(raw) > self.MAX_LINE:
            if raw.strip():
                self._warn(f"a line over {self.MAX_LINE} bytes skipped", once="line")
            return None
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            self._warn("a line that is not JSON skipped", once="json")
            return None
        if not isinstance(obj, dict):
            self._warn("a line that is not a JSON object skipped", once="json")
            return None
        key, value = obj.get("key"), obj.get("value")
        step, ts = obj.get("step", 0), obj.get("ts")
        if not valid_metric_name(key):
            self._warn(f"metric {str(key)[:80]!r} skipped: names may only hold letters, digits "
                       "and _ - . space : / (at most 250)", once=f"name:{str(key)[:80]}")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            self._warn(f"metric {key!r}: a value that is not a finite number skipped",
                       once=f"value:{key}")
            return None
        if ts is None:
            ts = int(time.time() * 1000)
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63
               for v in (step, ts)):
            self._warn(f"metric {key!r}: a step or ts that is not a non-negative integer "
                       "skipped", once=f"step:{key}")
            return None
        return key, float(value), ts, step

    def sync(self, final: bool = False) -> int:
        """Relay every new point; returns how many were sent."""
        with self._lock:
            if self._relayed >= self.max_points:
                return 0
            fresh = self._points(self._read_new(), final)
            for i in range(0, len(fresh), METRICS_PER_BATCH):
                self.host.log_batch(self.run_id, metrics=fresh[i:i + METRICS_PER_BATCH])
                self._relayed += len(fresh[i:i + METRICS_PER_BATCH])
            return len(fresh)


def log_measured(mlflow_client, run_id: str, metrics: dict[str, float]) -> None:
    """The host's own measurements on the run, stamped now at step 0."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    points = [Metric(k, float(v), now, 0) for k, v in metrics.items() if valid_metric_name(k)]
    for i in range(0, len(points), METRICS_PER_BATCH):
        mlflow_client.log_batch(run_id, metrics=points[i:i + METRICS_PER_BATCH])


def log_outputs(mlflow_client, run_id: str, files: list[Path]) -> None:
    """Upload the plots (the job log goes up when the job ends)."""
    for path in files:
        if path.is_file():
            mlflow_client.log_artifact(run_id, str(path))


# --- the training dataset as an MLflow dataset input ---------------------------------------

DIGEST_CHARS = 16  # MLflow keeps at most 36; 16 hex digits of the content hash never collide


def dataset_digest(dataset_row: dict) -> str:
    """The start of the dataset's content hash (of its id when it has none)."""
    digest = dataset_row.get("content_hash") or \
        hashlib.sha256(dataset_row["id"].encode()).hexdigest()
    return digest[:DIGEST_CHARS]


def log_dataset_input(mlflow_client, run_id: str, dataset_row: dict) -> None:
    """The run's training dataset (the registry's dataset artifact) as an MLflow dataset input:
    the run page's "Datasets" shows its id, a digest of its content and where it comes from.

    name: the artifact id; digest: the start of its content_hash (the sha256 of its data);
    source: its citation's URL (an HTTP source); profile: the citation's row count, format
    and schema summary. Nothing is read from the data itself."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    citation = (dataset_row.get("metadata") or {}).get("citation") or {}
    url = citation.get("url") or dataset_row.get("origin_url") or ""
    if url.startswith(("http://", "https://")):
        source_type, source = "http", HTTPDatasetSource(url).to_json()
    else:
        source_type, source = "url", json.dumps({"url": url})
    profile = {"num_rows": citation.get("row_count"), "format": citation.get("format"),
               "schema_summary": citation.get("schema_summary")}
    dataset = Dataset(name=dataset_row["id"], digest=dataset_digest(dataset_row),
                      source_type=source_type, source=source,
                      profile=json.dumps({k: v for k, v in profile.items() if v is not None}))
    inputs = [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
    # MLflow's store gets or creates the experiment's dataset row in two steps: parallel jobs
    # on one dataset race on its unique key. The loser finds the winner's row when it retries.
    for attempt in range(3):
        try:
            mlflow_client.log_inputs(run_id, datasets=inputs)
            return
        except Exception as exc:
            text = str(exc)
            if attempt == 2 or not ("UNIQUE constraint" in text or "duplicate key" in text):
                raise


# --- the checkpoint as an MLflow model -----------------------------------------------------

# The pyfunc flavor's model file is the family's `mlflow_model` in the HOST's copy of the
# family's code (MLflow runs it when it logs the model, so it must be trusted code, never the
# job's); it imports only mlflow at the top.
REQUIREMENTS = ("numpy", "scipy", "scikit-learn", "pandas", "mlflow")
MAX_VOCAB_BYTES = 16 * 1024**2  # scGPT's whole-human vocab.json (60,697 genes) is ~1.4 MB
# One optional double column per gene: 500 genes (CBMC) make a 35 KB MLmodel, 60,697 genes
# (scGPT's human vocabulary) 4.2 MB, rebuilt in ~3 s on each log and parsed on each load. Past
# this many genes the signature keeps the output only and the MLmodel metadata says where the
# gene list is (the checkpoint's vocab.json): the model takes any columns, and predict()
# drops the genes the vocabulary lacks, as the trainer does.
MAX_SIGNATURE_GENES = 2000


class VocabError(ValueError):
    """vocab.json is not what a checkpoint's gene vocabulary must be."""


def read_genes(vocab_path: Path) -> list[str]:
    """The gene names of a stored vocab.json (a JSON object gene -> id), without `<pad>`,
    `<cls>`, `<eoc>` or any other `<...>` token, in id order. Read without following links,
    at most MAX_VOCAB_BYTES; anything but string keys with integer ids is refused."""
    try:
        data, size = read_job_file(vocab_path, limit=MAX_VOCAB_BYTES + 1)
    except NotPlainFile as exc:
        raise VocabError(f"vocab.json {exc}") from None
    if size > MAX_VOCAB_BYTES:
        raise VocabError(f"vocab.json is {size} bytes, over the {MAX_VOCAB_BYTES} allowed")
    try:
        vocab = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise VocabError(f"vocab.json is not JSON: {exc}") from None
    if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in vocab.items()):
        raise VocabError("vocab.json must map gene names (strings) to token ids (integers)")
    return [g for g, _ in sorted(vocab.items(), key=lambda kv: kv[1])
            if not (g.startswith("<") and g.endswith(">"))]


def cell_type_signature(genes: list[str]):
    """Input: one optional double column per gene (raw counts); output: string `cell_type`.
    Over MAX_SIGNATURE_GENES genes: the output only (see MAX_SIGNATURE_GENES)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = None
    if len(genes) <= MAX_SIGNATURE_GENES:
        inputs = Schema([ColSpec("double", gene, required=False) for gene in genes])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "cell_type")]))


def host_code_root(family: str) -> Path:
    """The root of the host's copy of `family`'s code: above the package its family.py was
    imported from (trainers.<name>.family -> the folder holding trainers/), wherever
    trainers/family.py FAMILIES finds it."""
    module = families.FAMILIES[family]
    return Path(sys.modules[module].__file__).parents[module.count(".")]


def requirements(family: str = "scgpt") -> list[str]:
    """The model's pip requirements, pinned to what is installed here; given explicitly, so
    MLflow never infers them by loading the model (which would import the job's code and
    load its checkpoint on the host)."""
    from importlib.metadata import version

    names = (*families.get(family).requirements, *REQUIREMENTS)
    return [f"{name}=={version(name)}" for name in names]


_GLOBAL_URI = threading.Lock()


@contextmanager
def _global_tracking_uri(uri: str):
    """MLflow's model logging (`Model.log`) and its SQL registry store (`create_model_version`
    with a `models:/<model_id>` source) use the process's tracking URI, not their client's.
    Set it for the call, then put back what was there, the MLFLOW_TRACKING_URI variable
    included (every test has its own store). One at a time within a process."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _GLOBAL_URI:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            with _use_tracking_uri(uri):
                yield
        finally:
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env


def log_model(mlflow_client, *, run_id: str, experiment_id: str, checkpoint: Path,
              vocab: Path | None, code_dir: Path, task: str, tags: dict[str, str],
              metrics: dict[str, float], dataset: dict | None = None,
              name: str = "model", family: str = "scgpt",
              genes: list[str] | None = None) -> dict[str, str]:
    """Log the job's checkpoint folder as an MLflow model of the host's run; returns
    {"model_id", "model_uri"} (`models:/<model_id>`).

    A cell-type classifier whose pinned code has its family's MLflow model code (e.g.
    trainers/scgpt/mlflow_model.py) becomes a pyfunc model from code, loadable with
    mlflow.pyfunc.load_model: the checkpoint is its `checkpoint` artifact, the pinned
    `trainers` package its code, the pip requirements explicit, a signature from `vocab` (the
    stored vocab.json of scGPT) or `genes` (what the family's inspect() read), and no input
    example: the host never runs a checkpoint a job wrote. Any other checkpoint (a pretrained
    base, an older trainer) becomes a logged model holding the raw checkpoint files.

    The logged model is created with the run as its source and logged as the run's output
    (the run page lists it under "Logged models"); the candidate's test metrics are linked to
    it and to the dataset input. On failure it is deleted again and the error raised."""
    from mlflow.entities import LoggedModelOutput

    fam = families.get(family)
    pyfunc = task == fam.classifier_task and (code_dir / fam.mlflow_model).is_file()
    if pyfunc and vocab is not None:
        genes = read_genes(vocab)
    model = mlflow_client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags=tags,
        model_type=f"{fam.name}-cell-type-classifier" if pyfunc else f"{fam.name}-checkpoint")
    model_id = model.model_id
    try:
        if pyfunc:
            import mlflow

            with _global_tracking_uri(mlflow_client.tracking_uri), warnings.catch_warnings():
                # no input example on purpose: making one means running the model
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                mlflow.pyfunc.log_model(
                    name=name, model_id=model_id,
                    python_model=str(host_code_root(fam.name) / fam.mlflow_model),
                    artifacts={"checkpoint": str(checkpoint)},
                    code_paths=[str(code_dir / "trainers")],
                    pip_requirements=requirements(fam.name),
                    signature=cell_type_signature(genes) if genes is not None else None,
                    metadata={"family": fam.name, "n_genes": len(genes or []),
                              **({"input_genes": "artifacts/checkpoint/vocab.json"}
                                 if vocab is not None else {})})
        else:
            mlflow_client.log_model_artifacts(model_id, str(checkpoint))
        mlflow_client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        linked = [_linked(mlflow_client, run_id, model_id, key, metrics[key], dataset)
                  for key in sorted(metrics) if key.startswith("test_") and valid_metric_name(key)]
        if linked:
            mlflow_client.log_batch(run_id, metrics=linked)
        mlflow_client.finalize_logged_model(model_id, "READY")
    except BaseException:
        delete_model(mlflow_client, model_id)
        raise
    return {"model_id": model_id, "model_uri": f"models:/{model_id}"}


def _linked(mlflow_client, run_id: str, model_id: str, key: str, value: float,
            dataset: dict | None):
    """The run's last point of `key` again (the store keeps no duplicate), now linked to the
    logged model and the dataset: the model's page shows its metrics and what they were
    measured on."""
    from mlflow.entities import Metric

    history = mlflow_client.get_metric_history(run_id, key)
    last = history[-1] if history else Metric(key, float(value), int(time.time() * 1000), 0)
    return Metric(key, last.value, last.timestamp, last.step, model_id=model_id, run_id=run_id,
                  dataset_name=dataset["id"] if dataset else None,
                  dataset_digest=dataset_digest(dataset) if dataset else None)


def delete_model(mlflow_client, model_id: str) -> None:
    try:
        mlflow_client.delete_logged_model(model_id)
    except Exception:
        pass


# --- the registered version ----------------------------------------------------------------

def register_candidate(mlflow_client, *, name: str, run_id: str, artifact_id: str,
                       model_id: str | None = None, source: str | None = None,
                       version_number: int | None = None,
                       lifecycle_state: str = "candidate") -> dict[str, Any]:
    """Register a new version of the family's registered model from the logged model
    `model_id` (source `models:/<model_id>`; or from `source` without one), so
    `mlflow.pyfunc.load_model("models:/<family>/<version>")` loads what the run logged. A
    root version trained from scratch is `active`, as in the registry.

    MLflow numbers the versions of a registered model in the order they register; the
    registry numbers a version parent + 1. Two candidates of one parent are both registry
    version N+1 but get two MLflow numbers, so the numbers drift apart: the registry's number
    is the tag `forge.version_number`, beside MLflow's own, and `forge.artifact_id` names the
    registry artifact.

    A candidate is a state, not a pointer: many candidates of one family coexist, each tagged
    `forge.lifecycle_state=candidate` (find them with search_model_versions). Aliases name one
    version each (the eval gate's `champion`), so registering a candidate moves none of them,
    and parallel jobs never race on one."""
    try:
        mlflow_client.create_registered_model(name, description=family_description(name))
    except Exception as exc:  # already exists, or created concurrently by another job
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")) and \
                "already exists" not in str(exc) and "UNIQUE constraint" not in str(exc):
            raise
        if not mlflow_client.get_registered_model(name).description:  # made before this
            mlflow_client.update_registered_model(name, description=family_description(name))
    tags = {"forge.artifact_id": artifact_id, "forge.lifecycle_state": lifecycle_state}
    if version_number is not None:
        tags["forge.version_number"] = str(version_number)
    if model_id is not None:
        # the SQL registry store finds the logged model through the process's tracking URI
        with _global_tracking_uri(mlflow_client.tracking_uri):
            version = mlflow_client.create_model_version(
                name, source=source or f"models:/{model_id}", run_id=run_id, tags=tags,
                model_id=model_id)
    else:
        version = mlflow_client.create_model_version(name, source=source, run_id=run_id,
                                                     tags=tags)
    return {"registered_model": name, "version": str(version.version),
            "model_uri": f"models:/{name}/{version.version}"}


def describe_version(mlflow_client, name: str, version: str, text: str) -> None:
    """The version's description (Markdown in the MLflow UI)."""
    mlflow_client.update_model_version(name, version, description=text)


def unregister(mlflow_client, name: str, version: str) -> None:
    try:
        mlflow_client.delete_model_version(name, version)
    except Exception:
        pass


def run_agent(mlflow_client, run_id: str) -> str | None:
    """The agent a live run of this store was opened for: its `forge.agent_id` tag, which
    only the host writes (a job's run in launch, a sweep's parent run in runner/sweep.py).
    None for a run that is missing, deleted, or opened by no agent."""
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if run.info.lifecycle_stage != "active":
        return None
    return run.data.tags.get("forge.agent_id")


def finish(mlflow_client, run_id: str, ok: bool, reason: str | None = None) -> None:
    """End the run: FINISHED, FAILED, or KILLED when the job was cancelled."""
    if reason:
        mlflow_client.set_tag(run_id, "forge.outcome", reason)
    status = "FINISHED" if ok else "KILLED" if reason == "cancelled" else "FAILED"
    mlflow_client.set_terminated(run_id, status=status)
