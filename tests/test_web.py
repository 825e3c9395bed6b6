"""`forge serve` (runner/web): the pages over a real registry, served by uvicorn on a free
loopback port (Starlette's TestClient needs httpx, which is not installed) and read over HTTP.

Fast tests, on SQLite and PostgreSQL: versions registered the way a finished job registers
them (`hook.register_model_version`, with a real reserved allocation), a gate decision
written by `promotion.record_decision`; the detail page, the index, escaping, 404s, the
tool playground's dry run and the security headers.

Two slow tests render the real smoke demo's store, served by `forge serve` as a subprocess,
in headless Chromium: the candidate's detail page (and its screenshot), /tools, and a dry run
loaded as a GET; the index (its rejected versions with their metrics, sorted by the metric)
and /datasets.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import AGENT, BASE_ID, DATASET_ID, count_rows, scratch_code_repo, serving

REPO = Path(__file__).resolve().parents[1]
SPLIT = {"seed": 0, "counts": {"test": 100}, "sha256": {"test": "a" * 64}}
SCRIPT = '<script>alert("x")</script>'
EVIL_CLASS = "<img src=x onerror=alert(1)>"
EXPECTED_HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff"}


# --- serving and fetching ----------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str, form: dict | None = None) -> Reply:
    """GET `url`, or POST `form` url-encoded; no redirect followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    data = urllib.parse.urlencode(form).encode() if form is not None else None
    try:
        with urllib.request.build_opener(NoRedirect).open(url, data=data, timeout=120) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


@pytest.fixture
def web(registry):
    """create_app() over the test's registry, served by uvicorn in a thread; its base URL."""
    yield from _serve()


@pytest.fixture
def web_with_balances(registry):
    """The same, as `forge serve --show-balances` builds it (the operator's flag)."""
    yield from _serve(show_balances=True)


def _serve(**options):
    from runner.web.app import create_app

    with serving(create_app(**options)) as url:
        yield url


# --- a registry with versions ------------------------------------------------------------------

def _tracking_uri() -> str:
    from runner.config.compose import compose_resolved

    return compose_resolved(writable=False)[1]["tracking"]["tracking_uri"]


def _register(artifact_id: str, parent_id: str, metrics: dict, *, title: str,
              tracking_uri: str, per_class: dict) -> dict:
    """A version as a finished job registers it: allocation reserved, hook, settled."""
    from runner.jobs.hook import RunRecord, register_model_version
    from runner.registry import ledger

    alloc = ledger.reserve(AGENT, "0.5", f"web-{artifact_id}", wall_time_cap_min=60,
                           vram_cap_gb=1, price_per_hour="0.5")
    now = datetime.now(UTC)
    meta = {"family": "scgpt", "framework": "scgpt", "task": "finetune_celltype",
            "split": SPLIT, "test_cells": SPLIT["counts"]["test"],
            "class_names": list(per_class), "per_class_f1": per_class,
            "baseline": {"metrics": {}, "per_class_f1": {k: 0.9 for k in per_class}},
            "mlflow": {"experiment_id": "7", "tracking_uri": tracking_uri}}
    register_model_version(parent_id, RunRecord(
        artifact_id=artifact_id, title=title, metadata=meta, dataset_artifact_id=DATASET_ID,
        agent_id=AGENT, allocation_id=alloc["id"], actual_seconds=36.0,
        code_repo_url="https://example.org/forge-runner.git", code_commit_sha="c0ffee" + "0" * 34,
        code_entrypoint="trainers.entrypoint", training_started_at=now,
        training_completed_at=now, training_params={"training": {"lr": 1e-4}},
        eval_metrics=metrics, primary_metric="test_macro_f1", content_hash="b" * 64,
        mlflow_run_id=uuid.uuid4().hex, mlflow_model_uri="models:/scgpt/2",
        changelog=f"changelog {SCRIPT}"))
    return ledger.get_allocation(alloc["id"])


@pytest.fixture
def versions(registry) -> dict:
    """model-test-base (external) -> v2 (gated: rejected; tracked in another store) -> v3 (a
    candidate on the same held-out cells, tracked in the configured store)."""
    from runner.registry import ledger, promotion

    v2, v3 = "model-web-v2", "model-web-v3"
    alloc2 = _register(v2, BASE_ID, {"test_macro_f1": 0.70, "test_accuracy": 0.80,
                                     "baseline_test_macro_f1": 0.85, "epochs_trained": 3},
                       title=f"v2 {SCRIPT}", tracking_uri="sqlite:///elsewhere/mlflow.db",
                       per_class={"B": 0.5, EVIL_CLASS: 0.25})
    alloc3 = _register(v3, v2, {"test_macro_f1": 0.75, "test_accuracy": 0.82,
                                "baseline_test_macro_f1": 0.85},
                       title="v3", tracking_uri=_tracking_uri(), per_class={"B": 0.6})
    gate_alloc = ledger.reserve(AGENT, "0.01", "web-gate", wall_time_cap_min=1, vram_cap_gb=1,
                                price_per_hour="0.5", purpose="evaluation")
    promotion.record_decision(
        candidate_id=v2, champion_id=BASE_ID, decision="rejected",
        notes="rejected by gate: below the baseline", gate_name="default", gate_config={},
        gate_sha256="0" * 64, agent_id=AGENT, allocation_id=gate_alloc["id"],
        actual_seconds=1.0, magnitude=None, detection={},
        rows=[dict(comparator_artifact_id=None, comparator_role="baseline",
                   metric="test_macro_f1", candidate_value=0.70, comparator_value=0.85,
                   delta=-0.15, ci_low=-0.2, ci_high=-0.1, confidence=0.95, n_resamples=1000,
                   n_cells=100, seed=0, reasons=None)])
    return {"v2": v2, "v3": v3, "alloc2": alloc2, "alloc3": alloc3}


def _audit_rows(url: str) -> list[dict]:
    import sqlalchemy as sa

    from runner.registry import db, schema

    with db.get_engine(url).connect() as conn:
        return list(conn.execute(sa.select(schema.tool_calls.c.input_params)).scalars())


def _visible(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def _section(html: str, section_id: str) -> str:
    found = re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.DOTALL)
    assert found, f"no section {section_id!r}"
    return found[1]


# --- the pages -----------------------------------------------------------------------------------

def test_detail_page_shows_lineage_metrics_cost_code_and_citation(web, versions):
    from runner.registry import catalog

    page = fetch(f"{web}/artifacts/{versions['v3']}")
    assert page.status == 200, page.text
    html, text = page.text, _visible(page.text)
    # the parent link, and the lineage down from the root
    assert f'<a class="parent" href="/artifacts/{versions["v2"]}">{versions["v2"]}</a>' in html
    assert _visible(_section(html, "lineage")) == \
        f"Lineage {BASE_ID} v1 active {versions['v2']} v2 rejected {versions['v3']} v3 candidate"
    # metrics: the parent's on the same cells (comparable), the baseline's
    assert re.search(r"test_macro_f1 primary 0\.7500 0\.7000 \(\+0\.0500\) 0\.8500 "
                     r"\(-0\.1000\)", text), text
    assert "test_accuracy 0.8200 0.8000 (+0.0200) n/a" in text
    assert f"measured by the host on all {SPLIT['counts']['test']} held-out cells" in text
    # the cost: the allocation, as settled with the registration
    alloc = versions["alloc3"]
    assert alloc["status"] == "settled"
    for label, value in (("estimated", alloc["estimated_cost"]), ("debited", alloc["debited"]),
                         ("actual", alloc["actual_cost"]), ("refunded", alloc["refunded"])):
        assert f"{label} {value} credits" in text, label
    assert alloc["id"] in text
    # the code, the dataset's citation
    assert "c0ffee" + "0" * 34 in text and "https://example.org/forge-runner.git" in html
    citation = catalog.get_artifact(DATASET_ID)["metadata"]["citation"]
    for key in ("source", "external_id", "license", "doi"):
        assert str(citation[key]) in text, key
    assert f'href="{citation["url"]}"' in html
    # MLflow: the operator's UI, the run and the registered version
    assert re.search(r'href="http://127\.0\.0\.1:5000/#/experiments/7/runs/\w+"', html)
    # in the UI's training workflow (MLflow's UI defaults to its GenAI pages): the version,
    # and the experiment opened on its training runs
    ml = "?workflowType=machine_learning"
    assert f'href="http://127.0.0.1:5000/#/models/scgpt/versions/2{ml}"' in html
    assert f'href="http://127.0.0.1:5000/#/experiments/7{ml}"' in html
    assert f'src="/artifacts/{versions["v3"]}/confusion_matrix.png"' in html


def test_detail_page_shows_the_gate_decision_and_children(web, versions):
    page = fetch(f"{web}/artifacts/{versions['v2']}")
    assert page.status == 200
    text = _visible(page.text)
    # not comparable with the external base (it has no metrics); the children below it
    assert "not comparable: the parent has no test_macro_f1" in text
    assert f'href="/artifacts/{versions["v3"]}"' in page.text
    assert "promotion rejected notes rejected by gate: below the baseline" in text
    assert re.search(r"default baseline test_macro_f1 0\.7000 0\.8500 -0\.1500 "
                     r"\[-0\.2000, -0\.1000\] 100 rejected", text), text
    # tracked in another store: no links into this server's MLflow, no figure
    assert "tracked in another store" in text and "confusion_matrix.png" not in page.text
    figure = fetch(f"{web}/artifacts/{versions['v2']}/confusion_matrix.png")
    assert figure.status == 404


def test_registry_values_are_escaped(web, versions):
    page = fetch(f"{web}/artifacts/{versions['v2']}")
    assert "<script" not in page.text.lower()  # no script at all: title, changelog escaped
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text
    assert "<img src=x" not in page.text and "&lt;img src=x onerror=alert(1)&gt;" in page.text


def test_an_outside_url_is_a_link_only_when_http(web, registry):
    from runner.registry import catalog

    catalog.register_model(artifact_id="model-web-js", title="js", created_by="test",
                           metadata={"family": "scgpt", "framework": "scgpt"},
                           origin_type="external", origin_url="javascript:alert(1)")
    page = fetch(f"{web}/artifacts/model-web-js")
    assert page.status == 200
    assert "javascript:alert(1)" in page.text and 'href="javascript' not in page.text
    base = fetch(f"{web}/artifacts/{BASE_ID}")  # a file:// origin: shown, not linked
    assert "file://" in base.text and 'href="file:' not in base.text


def test_unknown_and_invalid_ids_are_404(web, registry):
    page = fetch(f"{web}/artifacts/model-nope")
    assert page.status == 404 and "does not exist" in page.text
    bad = fetch(f"{web}/artifacts/" + urllib.parse.quote("<b>x&y", safe=""))
    assert bad.status == 404 and "not a valid artifact id" in bad.text
    assert "<b>" not in bad.text and "&lt;b&gt;x&amp;y" in bad.text
    assert fetch(f"{web}/nowhere").status == 404


def test_index_lists_families_with_latest_champion_and_candidates(web, versions):
    page = fetch(f"{web}/")
    assert page.status == 200
    text = _visible(page.text)
    assert re.search(rf"scgpt 3 versions latest {versions['v3']} v3 candidate "
                     rf"champion {BASE_ID} v1 active candidates {versions['v3']} v3 candidate",
                     text), text
    assert f'href="/artifacts/{versions["v3"]}"' in page.text


def _index_rows(html: str) -> list[str]:
    """The index table's rows, as visible text, in the order the page shows them."""
    return [_visible(row) for row in re.findall(r'<tr class="version">(.*?)</tr>', html,
                                                re.DOTALL)]


def test_index_table_shows_every_version_with_metric_delta_cost_and_date(web, versions):
    page = fetch(f"{web}/")
    assert page.status == 200
    rows = {row.split()[0]: row for row in _index_rows(page.text)}
    assert set(rows) == {BASE_ID, versions["v2"], versions["v3"]}
    # the rejected version, with its metric and the gate's delta against the baseline
    assert re.fullmatch(rf"{versions['v2']} scgpt v2 rejected {DATASET_ID} 0\.7000 "
                        rf"test_macro_f1 -0\.1500 vs baseline \(gate\) "
                        rf"{versions['alloc2']['actual_cost']} credits \d{{4}}-\d\d-\d\d "
                        rf"\d\d:\d\d", rows[versions["v2"]]), rows[versions["v2"]]
    # an ungated candidate: against its parent, comparable on the same cells
    assert re.search(rf"{versions['v3']} scgpt v3 candidate {DATASET_ID} 0\.7500 "
                     rf"test_macro_f1 \+0\.0500 vs parent "
                     rf"{versions['alloc3']['actual_cost']} credits", rows[versions["v3"]])
    assert rows[BASE_ID].startswith(f"{BASE_ID} scgpt v1 active - - - - ")  # no metric, cost
    assert '<a href="/?sort=metric">' in page.text  # sortable from the headers, no script


def test_index_sorts_on_the_server_by_a_whitelisted_key(web, versions):
    def order(query: str) -> list[str]:
        page = fetch(f"{web}/?{query}")
        assert page.status == 200, page.text
        return [row.split()[0] for row in _index_rows(page.text)]

    v2, v3 = versions["v2"], versions["v3"]
    assert order("sort=metric&order=desc") == [v3, v2, BASE_ID]  # no metric: last either way
    assert order("sort=metric&order=asc") == [v2, v3, BASE_ID]
    assert order("sort=version&order=asc") == [BASE_ID, v2, v3]
    assert order("sort=state") == [BASE_ID, v3, v2]  # asc by default for text
    # the header of the sorted column flips the order
    assert '<a href="/?sort=metric&amp;order=asc">' in fetch(f"{web}/?sort=metric").text
    for query, field in (("sort=created_at;drop", "sort"), ("sort=metric&order=up", "order"),
                         ("sort=" + urllib.parse.quote("<b>"), "sort")):
        page = fetch(f"{web}/?{query}")
        assert page.status == 400, (query, page.status)
        assert f"field {field} fix" in _visible(page.text) and "<b>" not in page.text
    assert "did you mean &#39;metric&#39;" in fetch(f"{web}/?sort=metrc").text


def test_datasets_page_lists_each_dataset_with_the_versions_trained_on_it(web, versions):
    from runner.registry import catalog

    page = fetch(f"{web}/datasets")
    assert page.status == 200, page.text
    citation = catalog.get_artifact(DATASET_ID)["metadata"]["citation"]
    (row,) = [_visible(r) for r in re.findall(r'<tr class="dataset">(.*?)</tr>', page.text,
                                              re.DOTALL)]
    assert row.startswith(f"{DATASET_ID} CBMC CITE-seq {citation['source']} "
                          f"{citation['external_id']} {citation['license']} "
                          f"{citation['row_count']:,} 500 "), row
    assert f"{versions['v2']} v2 rejected" in row and f"{versions['v3']} v3 candidate" in row
    assert f'href="/artifacts/{versions["v3"]}"' in page.text
    assert '<a href="/datasets">Datasets</a>' in fetch(f"{web}/").text  # in the nav


def test_tools_lists_the_skills_with_their_schema(web, registry):
    page = fetch(f"{web}/tools")
    assert page.status == 200
    for name in ("Train Model Version", "Evaluate Candidate"):
        assert name in page.text
    assert "&#34;parent_artifact_id&#34;: {" in page.text  # the schema, pretty-printed
    assert '<form class="dry-run" method="post" action="/tools/dry-run">' in page.text


@pytest.fixture
def code_repo(tmp_path, monkeypatch) -> Path:
    return scratch_code_repo(tmp_path, monkeypatch)


def test_dry_run_renders_the_estimate_and_the_reasons(web_with_balances, registry, code_repo):
    web = web_with_balances
    form = {"parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
            "agent_id": AGENT, "overrides": "training.lr=0.0003\n\ntraining.max_epochs=2\n",
            "wall_time_cap_min": "60", "vram_cap_gb": "8"}
    before = count_rows(registry)
    page = fetch(f"{web}/tools/dry-run", form)
    assert page.status == 200, page.text
    text = _visible(page.text)
    assert "would_launch: yes" in text
    assert re.search(r"cost 0\.5\d* credits price per hour 0\.5\d* credits/h", text), text
    assert "balance 10" in text and "None: it would launch" in text
    after = count_rows(registry)
    assert after.pop("tool_calls") == before.pop("tool_calls") + 1  # its audit row, only
    assert after == before
    (call,) = _audit_rows(registry)  # the form as the call got it: caps as integers
    assert call["overrides"] == ["training.lr=0.0003", "training.max_epochs=2"]
    assert (call["wall_time_cap_min"], call["vram_cap_gb"], call["dry_run"]) == (60, 8, True)
    # an agent with no account: the estimate still, and the reason with its fix
    query = urllib.parse.urlencode({**form, "agent_id": "agent-nobody"})
    page = fetch(f"{web}/tools/dry-run?{query}")  # the same handler, as a GET
    assert page.status == 200
    text = _visible(page.text)
    assert "would_launch: no" in text and re.search(r"cost 0\.5\d* credits", text)
    assert "UnknownAgent unknown_agent" in text and "field agent_id" in text
    assert "forge ledger grant agent-nobody AMOUNT" in text
    assert fetch(f"{web}/tools/dry-run").status == 303  # nothing asked: back to the form


@pytest.mark.parametrize("field, value, reason, named", [
    ("parent_artifact_id", "../etc/<b>", "invalid_artifact_id", "parent_artifact_id"),
    ("wall_time_cap_min", "ten", "cap_out_of_policy", "wall_time_cap_min"),
    ("overrides", "+registry.db_url=x", "invalid_override", "registry.db_url"),
    ("surprise", "1", "invalid_input", "surprise"),
])
def test_a_malformed_dry_run_is_a_400_with_the_reason(web, registry, field, value, reason,
                                                      named):
    form = {"parent_artifact_id": BASE_ID, "dataset_artifact_id": DATASET_ID,
            "agent_id": AGENT, field: value}
    page = fetch(f"{web}/tools/dry-run", form)
    assert page.status == 400, page.text
    text = _visible(page.text)
    assert f" {reason} " in text and f"field {named} fix " in text, text
    assert "Traceback" not in page.text and "<b>" not in page.text


def test_security_headers_on_every_response(web, versions):
    replies = [fetch(f"{web}/"), fetch(f"{web}/artifacts/{versions['v3']}"),
               fetch(f"{web}/artifacts/model-nope"), fetch(f"{web}/static/style.css"),
               fetch(f"{web}/tools/dry-run", {"agent_id": "a"}), fetch(f"{web}/nowhere")]
    for reply in replies:
        for name, value in EXPECTED_HEADERS.items():
            assert reply.headers.get(name) == value, (reply.status, name)
        csp = reply.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'none'" in csp
        assert "frame-ancestors 'none'" in csp
    assert replies[3].headers["content-type"].startswith("text/css")
    assert not any("<script" in r.text.lower() for r in replies)  # no JavaScript anywhere


# --- the real demo in a browser (slow) -----------------------------------------------------------

@dataclass(frozen=True)
class Demo:
    home: Path
    code: Path
    trained: dict  # train_model_version()'s result, as the demo printed it


@pytest.fixture(scope="module")
def demo(smoke_demo) -> Demo:
    """The session's smoke demo (conftest), as tests/test_review_ui.py reads it too."""
    # the last family's training result (scGPT's: its run logs the confusion matrix)
    trained = [p for p in smoke_demo.printed if "gpu_allocation_id" in p][-1]
    return Demo(smoke_demo.home, smoke_demo.code, trained)


@pytest.fixture(scope="module")
def served(demo):
    """`forge serve` on the demo's store at a free loopback port; its base URL."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("FORGE_DB_URL", "FORGE_CONFIG_DIR")}
    env.update(FORGE_HOME=str(demo.home), FORGE_CODE_REPO=str(demo.code),
               MLFLOW_DISABLE_TELEMETRY="true")
    log_path = demo.home / "forge-serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("forge")), "serve", "--port", str(port)],
            cwd=demo.home, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"forge serve exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"forge serve silent:\n{log_path.read_text()}"
            try:
                if fetch(f"{url}/").status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        assert f"forge serve: {url}/" in log_path.read_text()
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
                server.wait(10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _chromium(chromium: str, profile: Path, *args: str) -> str:
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"chromium failed: {done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.sandbox
@pytest.mark.train
@pytest.mark.xdist_group("smoke_demo")
def test_the_demo_in_a_browser(chromium, demo, served, tmp_path):
    trained = demo.trained
    candidate, parent = trained["artifact_id"], trained["parent_artifact_id"]
    detail = f"{served}/artifacts/{candidate}"
    dom = _chromium(chromium, tmp_path / "profile", "--dump-dom", detail)
    text = _visible(dom)
    # the parent link, the metrics, the cost, the gate's decision
    assert f'<a class="parent" href="/artifacts/{parent}">{parent}</a>' in dom
    assert f"{trained['eval_metrics']['test_macro_f1']:.4f}" in text
    for label in ("estimated", "debited", "actual", "refunded"):
        assert f"{label} {trained['cost'][label]} credits" in text, label
    assert "Gate decision" in text and trained["gpu_allocation_id"] in text
    # the confusion matrix, read through the host's MLflow client
    figure = fetch(f"{detail}/confusion_matrix.png")
    assert figure.status == 200 and figure.headers["content-type"] == "image/png"
    assert figure.headers["x-content-type-options"] == "nosniff"
    assert figure.body.startswith(b"\x89PNG\r\n\x1a\n") and len(figure.body) > 10_000
    # the screenshot: a real, non-trivial PNG of the page
    shot = tmp_path / "detail_page.png"
    _chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1600",
              "--hide-scrollbars", detail)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 30_000, len(data)

    tools = _visible(_chromium(chromium, tmp_path / "profile", "--dump-dom", f"{served}/tools"))
    assert "Train Model Version" in tools and "Evaluate Candidate" in tools
    query = urllib.parse.urlencode({
        "parent_artifact_id": parent, "dataset_artifact_id": DATASET_ID,
        "agent_id": "demo-agent", "wall_time_cap_min": "10", "vram_cap_gb": "24"})
    dry = _visible(_chromium(chromium, tmp_path / "profile", "--dump-dom",
                             f"{served}/tools/dry-run?{query}"))
    assert "would_launch: yes" in dry, dry
    assert f"cost {trained['cost']['estimated']} credits" in dry, dry  # same cap, same price
    assert "balance" in dry and "None: it would launch" in dry


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.sandbox
@pytest.mark.train
@pytest.mark.xdist_group("smoke_demo")
def test_the_demo_index_and_datasets_in_a_browser(chromium, demo, smoke_demo, served,
                                                  tmp_path):
    """The index shows every version of the demo, its rejected ones with their metrics, and
    sorting by the metric (a link in the header, no script) reorders it; /datasets lists the
    demo's dataset with the versions trained on it."""
    decided = {p["candidate_artifact_id"]: p for p in smoke_demo.printed if "decision" in p}
    rejected = [i for i, p in decided.items() if p["decision"] == "rejected"]
    assert rejected, f"the smoke demo rejected nothing: {decided}"
    trained = {p["artifact_id"]: p for p in smoke_demo.printed if "gpu_allocation_id" in p}

    def rows(query: str = "") -> list[str]:
        dom = _chromium(chromium, tmp_path / "profile", "--dump-dom", f"{served}/{query}")
        return _index_rows(dom)

    shown = {row.split()[0]: row for row in rows()}
    for artifact_id in rejected:
        metrics = trained[artifact_id]["eval_metrics"]
        assert f" rejected {DATASET_ID} {metrics['test_macro_f1']:.4f} test_macro_f1 " in \
            shown[artifact_id], shown[artifact_id]
    ranked = [r.split()[0] for r in rows("?sort=metric&order=desc")]
    low_first = [r.split()[0] for r in rows("?sort=metric&order=asc")]
    scored = [i for i in ranked if i in trained and
              trained[i]["eval_metrics"].get("test_macro_f1") is not None]
    values = [trained[i]["eval_metrics"]["test_macro_f1"] for i in scored]
    assert len(values) >= 2 and values == sorted(values, reverse=True), (scored, values)
    assert [i for i in low_first if i in scored] == scored[::-1]
    assert ranked != low_first

    dom = _chromium(chromium, tmp_path / "profile", "--dump-dom", f"{served}/datasets")
    (row,) = [_visible(r) for r in re.findall(r'<tr class="dataset">(.*?)</tr>', dom, re.DOTALL)
              if DATASET_ID in r]
    assert row.startswith(f"{DATASET_ID} ") and "GSE100866" in row and "8,617 500" in row
    for artifact_id in rejected:
        assert artifact_id in row


def test_a_foreign_host_header_is_refused(web, versions):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 must not
    read the registry through the visitor's browser. Only loopback Host headers are served."""
    import http.client

    host, port = web.removeprefix("http://").split(":")
    for name, expect in (("evil.example", 400), (f"evil.example:{port}", 400),
                         (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200)):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", f"/artifacts/{versions['v3']}", headers={"Host": name})
        reply = conn.getresponse()
        body = reply.read().decode(errors="replace")
        conn.close()
        assert reply.status == expect, (name, reply.status)
        if expect == 400:
            assert versions["v3"] not in body
