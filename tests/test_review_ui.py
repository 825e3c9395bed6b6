"""What a reviewer sees in the MLflow UI after `make demo DEMO=smoke`, read from the pages
headless Chromium renders (the DOM after the single-page app ran), not from the REST API.

The real smoke demo builds its store in a temporary FORGE_HOME (a base, a fine-tuned
candidate, the gate's decision); `mlflow server` serves that store; Chromium renders:

- the candidate's run page (the demo's own mlflow_url route): the dataset input under
  "Datasets", the logged model under "Logged models", the registered version, the decision tag;
- the model version page: the decision in the description, the `champion` alias when
  promoted (none when rejected), the registry's version number as a tag;
- the experiment, opened by forge's route: its training runs, not the GenAI overview;
- the run's note and the version's description: what the version is, with links to the
  parent's version and run;
- the run's artifacts tab opened on the gate report: the report's folder in the tree, the
  report's JSON in the preview, and each figure previewed as an image.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import forget_engine

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = "dataset-geo-GSE100866"  # runner.demo trains and gates on CBMC
BUDGET_MS = 10_000  # Chromium's virtual time for the app to fetch and render; doubled on retry

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.sandbox, pytest.mark.train,
              pytest.mark.xdist_group("smoke_demo")]  # one worker makes the demo (make test)


# --- the demo's store ------------------------------------------------------------------------

@dataclass(frozen=True)
class Demo:
    home: Path
    tracking_uri: str
    trained: dict  # train_model_version()'s result, as the demo printed it
    decision: dict  # evaluate_candidate()'s result
    dataset_digest: str  # what the run's dataset input should show: the registry's content hash

    @property
    def run_route(self) -> str:
        """The run page the demo tells the reviewer to open, on whichever server serves it."""
        return self.trained["mlflow_url"].partition("#")[2]

    @property
    def experiment_id(self) -> str:
        return re.fullmatch(r"/experiments/(\w+)/runs/\w+", self.run_route)[1]

    @property
    def run_id(self) -> str:
        return self.decision["mlflow"]["run_id"]

    @property
    def model_version(self) -> tuple[str, str]:
        name, _, version = self.decision["mlflow"]["model_uri"].removeprefix(
            "models:/").rpartition("/")
        return name, version


@pytest.fixture(scope="module")
def demo(smoke_demo) -> Demo:
    """The session's smoke demo (conftest): its training result, decision and store."""
    home = smoke_demo.home
    printed = smoke_demo.printed
    assert len(printed) >= 2, f"expected the training result and the decision: {printed}"
    trained, decision = printed[-2:]
    assert decision["candidate_artifact_id"] == trained["artifact_id"]
    assert decision["decision"] in ("promoted", "rejected"), decision

    from runner.config.compose import compose_config, to_plain
    from runner.jobs import tracking
    from runner.registry import catalog
    from runner.settings import db_url

    with pytest.MonkeyPatch.context() as mp:  # the demo's env: its defaults resolve the same
        mp.setenv("FORGE_HOME", str(home))
        mp.delenv("FORGE_DB_URL", raising=False)
        mp.delenv("FORGE_CONFIG_DIR", raising=False)
        tracking_uri = to_plain(compose_config())["tracking"]["tracking_uri"]
        try:
            digest = tracking.dataset_digest(catalog.get_artifact(DATASET_ID))
        finally:
            forget_engine(db_url())
    return Demo(home, tracking_uri, trained, decision, digest)


# --- the UI server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ui(demo) -> Iterator[str]:
    """`mlflow server` on the demo's store at a free local port; its base URL. The artifacts
    are read from the runs' absolute file:// locations, so no artifact proxy is served."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    log_path = demo.home / "mlflow-server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server",
             "--backend-store-uri", demo.tracking_uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--no-serve-artifacts"],
            cwd=demo.home, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: uvicorn's worker goes with it
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, server, log_path)
        yield url
    finally:
        _stop(server)


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """The whole process group: the CLI, uvicorn and its worker."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the browser -----------------------------------------------------------------------------

@dataclass
class Page:
    """A rendered page: its visible text (whitespace collapsed), links and images."""
    text: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)  # (href, text)
    images: list[dict[str, str]] = field(default_factory=list)  # attributes


class _Reader(HTMLParser):
    HIDDEN = frozenset({"script", "style", "noscript", "svg", "title"})

    def __init__(self):
        super().__init__()
        self.page, self._chunks, self._hidden, self._link = Page(), [], 0, None

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self._hidden += 1
        elif tag == "a":
            self._link = (dict(attrs).get("href") or "", len(self._chunks))
        elif tag == "img":
            self.page.images.append({k: v or "" for k, v in attrs})

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag == "a" and self._link:
            href, start = self._link
            self.page.links.append((href, " ".join(" ".join(self._chunks[start:]).split())))
            self._link = None

    def handle_data(self, data):
        if not self._hidden and data.strip():
            self._chunks.append(data.strip())

    def close(self):
        super().close()
        self.page.text = " ".join(" ".join(self._chunks).split())
        return self.page


@pytest.fixture(scope="module")
def browse(chromium, ui, tmp_path_factory):
    """`browse(route, ready)`: the page at `#<route>` as headless Chromium renders it. `ready`
    is text the page shows once its data arrived; a render without it (the app still loading)
    is retried once with twice the time."""
    profile = tmp_path_factory.mktemp("chromium-profile")

    def render(route: str, budget_ms: int) -> Page:
        done = subprocess.run(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom",
             f"{ui}/#{route}"], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"chromium failed on {route}:\n{done.stderr[-2000:]}"
        reader = _Reader()
        reader.feed(done.stdout)
        return reader.close()

    def browse(route: str, ready: str) -> Page:
        page = render(route, BUDGET_MS)
        if ready not in page.text:
            page = render(route, 2 * BUDGET_MS)
        assert ready in page.text, f"{route} never showed {ready!r}; it shows: {page.text[:3000]}"
        return page

    return browse


# --- what the reviewer sees --------------------------------------------------------------------

def test_run_page_shows_the_dataset_input_and_the_logged_model(demo, browse):
    page = browse(demo.run_route, ready="Logged models (1)")
    # "Datasets" in the run's details: the registry's dataset id, its digest, its context
    shown = re.search(rf"Datasets {DATASET_ID} \((\w+)\) training", page.text)
    assert shown, page.text
    assert shown[1] == demo.dataset_digest
    # "Logged models (1)": the checkpoint's model, READY, linking to its own page
    assert "Logged models (1)" in page.text
    assert re.search(r"\bmodel Ready\b", page.text)
    assert any(re.fullmatch(rf"#/experiments/{demo.experiment_id}/models/m-\w+", href)
               and text == "model" for href, text in page.links), page.links
    # the registered version it became, and the gate's decision as a run tag
    name, version = demo.model_version
    assert f"Registered models {name} v{version}" in page.text
    assert (f"#/models/{name}/versions/{version}", f"{name} v{version}") in page.links
    assert f"forge.gate_decision : {demo.decision['decision']}" in page.text


def test_experiment_opens_on_its_training_runs(demo, browse):
    """The experiment's page as forge links it: its runs table with the demo's run, not the
    GenAI overview. The experiment carries mlflow.experimentKind=custom_model_development,
    which MLflow 3.17's UI no longer reads for this (its workflow switch does, GenAI by
    default), so forge's UI routes name the training workflow (tracking.UI_WORKFLOW)."""
    from runner.jobs import tracking

    candidate = demo.trained["artifact_id"]
    page = browse(tracking.experiment_route(demo.experiment_id).removeprefix("#"),
                  ready=candidate)
    assert "Run Name" in page.text and "Traces 0" not in page.text, page.text[:2000]
    assert any(href.startswith(f"#{demo.run_route}") and text == candidate
               for href, text in page.links), page.links
    client = tracking.client(demo.tracking_uri)
    assert client.get_experiment(demo.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"


def test_run_and_version_descriptions_say_what_it_is_and_link_the_parent(demo, browse):
    from runner.jobs import tracking

    candidate, parent = demo.trained["artifact_id"], demo.trained["parent_artifact_id"]
    name, version = demo.model_version
    head = f"{candidate} (registry v{demo.trained['version_number']}): a "
    # the version's description: what it is, and links to the parent's version and run
    page = browse(f"/models/{name}/versions/{version}", ready="forge.artifact_id")
    assert head in page.text and f"on dataset {DATASET_ID}" in page.text, page.text
    assert "Host-measured test_macro_f1: " in page.text
    links = {text: href for href, text in page.links}
    ml = re.escape(tracking.UI_WORKFLOW)
    parent_version = links.get(f"{parent} v{demo.trained['version_number'] - 1}", "")
    assert re.fullmatch(rf"#/models/{name}/versions/\d+{ml}", parent_version), page.links
    parent_run = links.get("training run", "")
    assert re.fullmatch(rf"#/experiments/\d+/runs/\w+{ml}", parent_run), page.links
    # they lead to the parent: its version, its run (opened in the training workflow)
    base = browse(parent_version.removeprefix("#"), ready="forge.artifact_id")
    assert f"{parent} (registry v1): a " in base.text and "trained from scratch" in base.text
    run = browse(parent_run.removeprefix("#"), ready="Description")
    assert f"{parent} (registry v1): a " in run.text, run.text[:2000]
    # the candidate's run note: the same paragraph above the run's details
    run = browse(demo.run_route, ready="Logged models (1)")
    assert head in run.text and "Host-measured test_macro_f1: " in run.text


def test_model_version_page_shows_the_decision(demo, browse):
    name, version = demo.model_version
    page = browse(f"/models/{name}/versions/{version}", ready="forge.artifact_id")
    decision = demo.decision["decision"]
    gate = demo.decision["gate"]
    # the description ends with the gate's note ("rejected by gate: macro_f1 ... CI ...")
    assert f"Gate {gate}: {decision} by gate: " in page.text
    assert demo.decision["notes"][:120] in page.text
    # the alias field: `@ champion` on promotion, nothing (the "Add" button) on rejection
    if decision == "promoted":
        assert "Aliases : @ champion" in page.text
    else:
        assert "Aliases : Add" in page.text and "@ champion" not in page.text
    # tags: the registry's version number beside MLflow's, the artifact, the states
    for key, value in (("forge.version_number", demo.trained["version_number"]),
                       ("forge.artifact_id", demo.trained["artifact_id"]),
                       ("forge.lifecycle_state", demo.decision["lifecycle_state"]),
                       ("forge.gate_decision", decision)):
        assert f"{key} {value} " in page.text, key


def test_artifacts_tab_shows_the_gate_report(demo, browse):
    folder = f"gate/{demo.decision['gate']}"
    run_artifacts = f"/experiments/{demo.experiment_id}/runs/{demo.run_id}/artifacts"
    page = browse(f"{run_artifacts}/{folder}/report.json", ready=f"{folder}/report.json")
    # the tree, opened down to the report: the gate's folder with the report and both figures
    assert f"gate {demo.decision['gate']} bootstrap.png per_class_f1.png report.json" \
        in page.text
    # the preview: the report's JSON, as the UI pretty-prints it
    assert re.search(rf'"decision" : "{demo.decision["decision"]}"', page.text)
    assert f'"candidate_artifact_id" : "{demo.decision["candidate_artifact_id"]}"' in page.text
    # each figure previewed as an image: the UI fetched its bytes and shows them as a blob
    for figure in ("bootstrap.png", "per_class_f1.png"):
        page = browse(f"{run_artifacts}/{folder}/{figure}", ready=f"{folder}/{figure}")
        assert any(img.get("alt") == f"{folder}/{figure}" and img.get("src", "").startswith(
            "blob:") for img in page.images), page.images
