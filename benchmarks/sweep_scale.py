"""A sweep of tiny fine-tunes through each Hydra launcher: wall time, throughput, overhead.

Runs the same N-job sweep (default 16: `training.lr=1e-3,5e-4,3e-4,1e-4
training.seed=0,1,2,3` with `sweep=tiny_grid`: 1 epoch, 4 training batches of 32 cells at
33 genes, 2 eval batches) of a tiny scGPT base (2 layers, d_model 32) fine-tuned on the real
CBMC cells, through `forge-train -m` as a subprocess, once per launcher:

  basic            Hydra's basic launcher: the jobs one after another in one process
  submitit_local   hydra/launcher=submitit_local: one process per job on this host, all at once
  forge_slurm      hydra/launcher=forge_slurm: one sbatch job array on the SLURM cluster
                   (deploy/slurm/up.sh), FORGE_SLURM_CPUS_PER_TASK=1, FORGE_SLURM_MEM_GB=2

Every job really trains: each run (launcher x repeat) gets a fresh PostgreSQL registry
(CREATE DATABASE ... TEMPLATE of one migrated here, dropped at the end) and a fresh
FORGE_HOME with its own MLflow store (tracking=local; the store's schema is created before
the clock starts, as an operator's store already exists). The dataset cache and the base
checkpoint are shared. The code is this checkout (allow_dirty=true; FORGE_CODE_REPO if set).

For each run it reads the registry's allocations (created_at = reserve, started_at,
settled_at, actual_seconds = the sandbox's wall) and each job's result.json back from its
MLflow run (timings: train_s, test_s, total_s; baseline_s from jobs that still refitted the
logistic-regression baseline themselves), and prints:

  W              the sweep's wall time, forge-train started to exited; jobs/min = N / W
  fit            the trainer's own work: Lightning fit + test (train_s + test_s, and an
                 older job's baseline_s); sum over the jobs. The host's baseline fit (one
                 per split, kept in the cache) is in-job overhead
  job wall       settled_at - created_at, median over the jobs
  in-job ovh     (settled_at - created_at) - fit, mean over the jobs: the debit, code pin,
                 MLflow run, sandbox start, the trainer's imports and data loading,
                 registration, settlement. Split into: reserve->start (started_at -
                 created_at: debit, code pin, MLflow run), the jail (actual_seconds -
                 total_s: bubblewrap, interpreter start), the trainer less its fit (total_s -
                 fit: imports, data loading, figures, checkpoint) and the rest of the host
                 side (settled_at - started_at - actual_seconds: manifest, metric relay,
                 uploads, registration, settlement)
  launcher ovh   (W - (last settled_at - first created_at)) / N: start-up, the budget gate
                 and code pin, submission, queueing before the first job, collection and the
                 summary after the last

and at the end a side-by-side table (medians over --repeats) with ratios to basic. Jobs that
run at once share the CPU: under submitit_local (every job at once) or SLURM (one CPU a task)
fit and every in-job part stretch with the contention, so read them with jobs/min.

    .venv/bin/python benchmarks/sweep_scale.py [--jobs 16] [--repeats 1] \
        [--launchers basic,submitit_local,forge_slurm] [--keep]

A launcher whose sweep fails is reported (log tail) and left out of the table; SLURM not up
(`sinfo` shows no idle/mixed/allocated node) skips forge_slurm with a note. Progress goes to
stderr; the figures to stdout. 16 jobs take several minutes per launcher on a 2-core CPU.

Targets, on a quiet machine: in-job overhead <= 3 s a job on every launcher (as
benchmarks/overhead.py's); launcher overhead <= 2 s a job for basic and submitit_local and
<= 5 s a job for forge_slurm; the parallel launchers' jobs/min at least basic's (on a 2-core
host each job's training already uses both cores, so parallelism cannot gain much there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORGE_TRAIN = [sys.executable, "-c", "from runner.train_app import main; main()"]
LAUNCHERS = ("basic", "submitit_local", "forge_slurm")
LRS = ("1e-3", "5e-4", "3e-4", "1e-4")
AGENT = "bench-sweep"
BASE_ID = "model-bench-sweep-base"
DATASET_ID = "dataset-geo-GSE100866"
ARCH = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_hid": 64, "n_bins": 51,
        "dropout": 0.0, "input_emb_style": "continuous"}
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def say(message: str) -> None:
    print(f"[sweep_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def grid(n: int) -> list[str]:
    """`n` jobs as lr x seed: as square as the four learning rates allow (16 -> 4 x 4)."""
    n_lr = max(d for d in range(1, len(LRS) + 1) if n % d == 0 and d * d <= n)
    return [f"training.lr={','.join(LRS[:n_lr])}",
            f"training.seed={','.join(str(s) for s in range(n // n_lr))}"]


# --- PostgreSQL: a migrated template, one fresh database per run ----------------------------

class Postgres:
    def __init__(self, admin_url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.admin_url = sa.engine.make_url(admin_url)
        self.made: list[str] = []

    def _admin(self):
        return self.sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT",
                                     poolclass=self.sa.pool.NullPool)

    def url(self, name: str) -> str:
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def create(self, prefix: str, template: str | None = None) -> str:
        name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        with self._admin().connect() as conn:
            conn.exec_driver_sql(sql)
        self.made.append(name)
        return name

    def drop_all(self) -> None:
        from runner.registry import db

        for name in reversed(self.made):
            db.get_engine(self.url(name)).dispose()
            with self._admin().connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        db._engine.cache_clear()
        self.made.clear()


# --- what every run shares: dataset cache, base checkpoint, migrated templates --------------

def make_base(folder: Path) -> None:
    from runner.jobs.datasets import fetch
    from trainers.data.load import load
    from trainers.scgpt.model import ScGPT, ScGPTConfig, save_checkpoint
    from trainers.scgpt.tokenize import GeneVocab

    vocab = GeneVocab.from_genes(load(fetch("cbmc"), "cbmc_mat").genes)
    config = ScGPTConfig(vocab_size=len(vocab), pad_token_id=vocab.pad_id, dropout=0.0,
                         **{k: v for k, v in ARCH.items() if k != "dropout"})
    save_checkpoint(ScGPT(config), vocab.stoi, folder)


def prepare(root: Path, pg: Postgres) -> dict:
    from runner.api import SKILLS
    from runner.jobs import tracking
    from runner.registry import db
    from runner.tools import register_tools

    say("fetching CBMC, building the tiny base, migrating the registry and MLflow templates")
    make_base(root / "base")
    template = pg.create("forge_bench_tpl")
    url = pg.url(template)
    os.environ["FORGE_DB_URL"] = url
    db.upgrade(url)
    register_tools(SKILLS)
    db.get_engine(url).dispose()  # PostgreSQL copies a template only while nobody is on it
    mlflow_db = root / "mlflow-template.db"
    tracking.client(f"sqlite:///{mlflow_db}").search_experiments()  # creates the schema
    return {"template": template, "mlflow_db": mlflow_db, "base": root / "base"}


def seed_run(home: Path, url: str, shared: dict) -> None:
    """A fresh registry (dataset, base, credits) and a fresh MLflow store for one run."""
    from runner.jobs import weights
    from runner.jobs.datasets import builtin_citation
    from runner.registry import catalog, ledger

    home.mkdir(parents=True)
    shutil.copy(shared["mlflow_db"], home / "mlflow.db")
    # every sweep fits its baselines itself (runner/jobs/truth.py keeps each fit in the cache):
    # a later sweep on the same splits would not, which is not the cost being compared
    shutil.rmtree(Path(os.environ["FORGE_CACHE_DIR"]) / "baselines", ignore_errors=True)
    os.environ.update(FORGE_HOME=str(home), FORGE_DB_URL=url)
    catalog.register_dataset(DATASET_ID, "CBMC CITE-seq", builtin_citation("cbmc"))
    catalog.register_model(
        artifact_id=BASE_ID, title="tiny scGPT base (sweep_scale)", created_by="bench",
        metadata={"family": "scgpt", "framework": "scgpt", "task": "external",
                  "architecture": ARCH},
        origin_type="external", origin_url=shared["base"].as_uri(),
        content_hash=weights.tree_hash(weights.file_hashes(shared["base"])))
    ledger.grant(AGENT, "100")


# --- one sweep ----------------------------------------------------------------------------

def slurm_up() -> str | None:
    """None when the cluster answers with a usable node, else why not."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "SLURM is not installed (bash deploy/slurm/up.sh installs and starts it)"
    try:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True,
                                text=True, timeout=30, check=False).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"no SLURM node is up (sinfo: {states or 'nothing'}; bash deploy/slurm/up.sh)"
    return None


def allocations(url: str) -> list[dict]:
    import sqlalchemy as sa

    from runner.registry import db, schema

    t = schema.resource_allocations
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(t).where(t.c.purpose == "training")).mappings()]


def epoch(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def scancel_sweep(home: Path) -> None:
    """Cancel the SLURM jobs this run submitted (their ids from submitit's folders), only."""
    ids = {p.name.split("_")[0] for p in home.glob("runs/*/*/.submitit/*") if p.is_dir()}
    ids = {i for i in ids if i.isdigit()}
    if ids and shutil.which("scancel"):
        subprocess.run(["scancel", *sorted(ids)], check=False)


def run_sweep(launcher: str, n_jobs: int, home: Path, url: str, timeout: float,
              tree: Path | None = None, label: str | None = None) -> dict:
    """One sweep through `launcher`; with `tree`, that checkout's code runs it (first on
    PYTHONPATH, and the code the jobs pin)."""
    args = ["-m", "sweep=tiny_grid", f"agent_id={AGENT}", "allow_dirty=true",
            f"parent_artifact_id={BASE_ID}", *grid(n_jobs)]
    if launcher != "basic":
        args.append(f"hydra/launcher={launcher}")
    env = {**os.environ, "FORGE_HOME": str(home), "FORGE_DB_URL": url, "COLUMNS": "200",
           "FORGE_SLURM_CPUS_PER_TASK": "1", "FORGE_SLURM_MEM_GB": "2"}
    if tree is not None:
        env.update(PYTHONPATH=str(tree), FORGE_CODE_REPO=str(tree))
    log = home / "forge-train.log"
    say(f"{launcher}: forge-train {' '.join(args)}")
    with open(log, "w") as out:
        t0 = time.time()
        proc = subprocess.Popen([*FORGE_TRAIN, *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        last, rc = 0.0, None
        try:
            while (rc := proc.poll()) is None:
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"{launcher}: the sweep ran past {timeout:.0f}s")
                time.sleep(1.0)
                if time.time() - last >= 15:
                    last = time.time()
                    states = [a["status"] for a in allocations(url)]
                    say(f"{launcher}: {time.time() - t0:5.0f}s, {states.count('settled')}/"
                        f"{n_jobs} settled, {states.count('running')} running, "
                        f"{len(states) - states.count('settled') - states.count('running')}"
                        " other")
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)  # the process group this script started
            proc.wait(timeout=60)
            if launcher == "forge_slurm":
                scancel_sweep(home)
            raise
        wall = time.time() - t0
    allocs = allocations(url)
    settled = [a for a in allocs if a["status"] == "settled"]
    if rc != 0 or len(settled) != n_jobs:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{launcher}: forge-train exited {rc} with {len(settled)}/{n_jobs} "
                           f"jobs settled ({sorted({a['status'] for a in allocs})}); "
                           f"log {log}:\n{tail}")
    return measure(label or launcher, n_jobs, wall, settled, home)


def read_result(client, run_id: str, dest: Path) -> dict:
    path = client.download_artifacts(run_id, "result.json", str(dest))
    return json.loads(Path(path).read_text())


def measure(launcher: str, n_jobs: int, wall: float, allocs: list[dict], home: Path) -> dict:
    from runner.jobs import tracking

    client = tracking.client(f"sqlite:///{home / 'mlflow.db'}")
    jobs = []
    for i, a in enumerate(allocs):
        timings = read_result(client, a["mlflow_run_id"], home / "results" / str(i))["timings"]
        fit = sum(float(timings.get(k) or 0.0) for k in ("train_s", "test_s", "baseline_s"))
        created, started, settled = (epoch(a[k]) for k in ("created_at", "started_at",
                                                           "settled_at"))
        sandbox, total = float(a["actual_seconds"]), float(timings.get("total_s") or fit)
        jobs.append({"created": created, "settled": settled, "fit": fit,
                     "train_s": float(timings.get("train_s") or 0.0),
                     "job_wall": settled - created, "in_job": settled - created - fit,
                     "pre": started - created, "trainer_other": total - fit,
                     "jail": sandbox - total, "post": settled - started - sandbox})
    span = max(j["settled"] for j in jobs) - min(j["created"] for j in jobs)

    def mean(key: str) -> float:
        return statistics.fmean(j[key] for j in jobs)

    figures = {
        "wall_s": wall, "jobs_per_min": 60.0 * n_jobs / wall, "span_s": span,
        "fit_sum_s": sum(j["fit"] for j in jobs), "fit_mean_s": mean("fit"),
        "train_mean_s": mean("train_s"),
        "job_wall_median_s": statistics.median(j["job_wall"] for j in jobs),
        "in_job_ovh_mean_s": mean("in_job"), "pre_mean_s": mean("pre"),
        "trainer_other_mean_s": mean("trainer_other"), "jail_mean_s": mean("jail"),
        "post_mean_s": mean("post"),
        "launcher_ovh_per_job_s": (wall - span) / n_jobs,
    }
    print(f"{launcher:>15}: W {wall:7.1f}s | {figures['jobs_per_min']:6.2f} jobs/min | "
          f"fit sum {figures['fit_sum_s']:6.1f}s (mean {figures['fit_mean_s']:.2f}s, "
          f"train_s {figures['train_mean_s']:.2f}s) | job wall median "
          f"{figures['job_wall_median_s']:.2f}s | in-job ovh {figures['in_job_ovh_mean_s']:.2f}s "
          f"(reserve->start {figures['pre_mean_s']:.2f}, jail {figures['jail_mean_s']:.2f}, "
          f"trainer less fit {figures['trainer_other_mean_s']:.2f}, host rest "
          f"{figures['post_mean_s']:.2f}) | "
          f"launcher ovh {figures['launcher_ovh_per_job_s']:.2f}s/job "
          f"(jobs span {span:.1f}s)", flush=True)
    return figures


# --- the table ----------------------------------------------------------------------------

ROWS = [("wall_s", "sweep wall W (s)"), ("jobs_per_min", "jobs/min"),
        ("fit_sum_s", "sum of fit (s)"), ("fit_mean_s", "fit per job, mean (s)"),
        ("job_wall_median_s", "job wall, median (s)"),
        ("in_job_ovh_mean_s", "in-job overhead, mean (s)"),
        ("pre_mean_s", "  reserve -> start (s)"), ("jail_mean_s", "  jail start/exit (s)"),
        ("trainer_other_mean_s", "  trainer less fit (s)"),
        ("post_mean_s", "  rest of the host side (s)"),
        ("launcher_ovh_per_job_s", "launcher overhead/job (s)")]
RATIOS = [("wall_s", "W / basic"), ("jobs_per_min", "jobs/min / basic"),
          ("in_job_ovh_mean_s", "in-job ovh / basic"),
          ("job_wall_median_s", "job wall / basic")]


IN_JOB_TARGET_S = 2.0  # issue 30: per-job overhead outside fit
COMPARE = "basic@compare"


def table(results: dict[str, list[dict]], n_jobs: int) -> None:
    names = [n for n in results if results.get(n)]
    med = {n: {k: statistics.median(r[k] for r in results[n]) for k, _ in ROWS} for n in names}
    width = max(len(label) for _, label in ROWS + RATIOS) + 2
    print(f"\n{n_jobs} jobs per sweep; medians over "
          + ", ".join(f"{n} n={len(results[n])}" for n in names))
    print("".ljust(width) + "".join(n.rjust(16) for n in names))
    for key, label in ROWS:
        print(label.ljust(width) + "".join(f"{med[n][key]:16.2f}" for n in names))
    if "basic" in med:
        for key, label in RATIOS:
            base = med["basic"][key]
            print(label.ljust(width) + "".join(
                (f"{med[n][key] / base:16.2f}" if base else "n/a".rjust(16)) for n in names))
    if "basic" in med and COMPARE in med:
        this, other = med["basic"], med[COMPARE]
        print(f"this tree / {COMPARE}: in-job overhead "
              f"{this['in_job_ovh_mean_s'] / other['in_job_ovh_mean_s']:.2f}, job wall "
              f"{this['job_wall_median_s'] / other['job_wall_median_s']:.2f}, "
              f"W {this['wall_s'] / other['wall_s']:.2f}")
    for n in names:
        ovh = med[n]["in_job_ovh_mean_s"]
        print(f"{n}: per-job overhead outside fit {ovh:.2f} s, target <= {IN_JOB_TARGET_S} s "
              f"{'ok' if ovh <= IN_JOB_TARGET_S else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16, help="jobs per sweep (lr x seed)")
    parser.add_argument("--repeats", type=int, default=1, help="sweeps per launcher")
    parser.add_argument("--launchers", default=",".join(LAUNCHERS))
    parser.add_argument("--pg-url", default=os.environ.get("FORGE_BENCH_PG_URL", DEFAULT_PG),
                        help="a PostgreSQL server's maintenance database (CREATE DATABASE)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per sweep")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--compare", type=Path,
                        help="another checkout: its basic sweep runs after each of this one's")
    parser.add_argument("--smoke", action="store_true",
                        help="a 1-job basic sweep: checks that the benchmark works (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.repeats, args.launchers, args.compare = 1, 1, "basic", None
    launchers = [n.strip() for n in args.launchers.split(",") if n.strip()]
    unknown = sorted(set(launchers) - set(LAUNCHERS))
    if unknown or args.jobs < 1 or args.repeats < 1:
        parser.error(f"unknown launchers {unknown}" if unknown else "--jobs, --repeats >= 1")
    if "forge_slurm" in launchers and (why := slurm_up()):
        say(f"skipping forge_slurm: {why}")
        print(f"forge_slurm skipped: {why}")
        launchers.remove("forge_slurm")
    if not launchers:
        return 0

    root = Path(tempfile.mkdtemp(prefix="forge-sweep-scale-"))
    os.environ.update(FORGE_HOME=str(root / "setup"), FORGE_CACHE_DIR=str(root / "cache"),
                      MLFLOW_DISABLE_TELEMETRY="true")
    pg = Postgres(args.pg_url)
    results: dict[str, list[dict]] = {n: [] for n in launchers}
    if args.compare is not None:
        results[COMPARE] = []
    failed = False
    try:
        shared = prepare(root, pg)
        say(f"{args.jobs} jobs ({' '.join(grid(args.jobs))}), launchers {launchers}, "
            f"{args.repeats} repeat(s); work in {root}")
        for rep in range(args.repeats):
            for launcher in launchers:
                home = root / f"{launcher}-{rep}"
                url = pg.url(pg.create(f"forge_bench_{launcher}", template=shared["template"]))
                seed_run(home, url, shared)
                try:
                    results[launcher].append(run_sweep(launcher, args.jobs, home, url,
                                                       args.timeout))
                except (RuntimeError, TimeoutError) as exc:
                    failed = True
                    say(str(exc))
                    print(f"{launcher:>15}: FAILED (repeat {rep}): {str(exc).splitlines()[0]}")
            if args.compare is not None:  # interleaved: after this tree's sweeps of the repeat
                home = root / f"compare-{rep}"
                url = pg.url(pg.create("forge_bench_compare", template=shared["template"]))
                seed_run(home, url, shared)
                try:
                    results[COMPARE].append(run_sweep("basic", args.jobs, home, url,
                                                      args.timeout, args.compare, COMPARE))
                except (RuntimeError, TimeoutError) as exc:
                    failed = True
                    say(str(exc))
                    print(f"{COMPARE:>15}: FAILED (repeat {rep}): {str(exc).splitlines()[0]}")
        table(results, args.jobs)
    finally:
        pg.drop_all()
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
