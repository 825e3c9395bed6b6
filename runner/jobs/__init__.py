"""A training job, from request to registered version: everything between the caller's
arguments and the registry, on the host side of the jail.

- `plan.py`: `TrainRequest` -> `Plan` (validate, compose, read the registry, price, pin the
  code, the sandbox job); reads, never writes. A dry run ends here.
- `job.py`: the job a plan runs on this host: its run dir, the disk it needs, and
  `sandbox_job()`, the one builder of what the sandbox runs (dry run and launch alike).
- `launch.py`: a `Plan` -> reserve/debit, inputs, MLflow run, sandbox, registration,
  settlement, each way out settled once.
- `hook.py`: a finished run's metrics and improvement over its parent, handed to the registry.
- `codepin.py`: the commit the job runs, and its snapshot. `weights.py`: the artifact store.
- `datasets.py`: fetching built-in and registered datasets, checked against their sha256.
- `devices.py`: the one device rule (which device a job gets, which price row it pays).
- `tracking.py`: the host's MLflow run and the relay of the job's metrics into it.
- `handback.py`: reading what the job wrote (result.json, its schema), never following links.
- `recovery.py`: what the reaper's settled allocations leave behind (MLflow runs, run dirs).
- `engine.py`: the scheduler the host process runs under (SLURM): its job id, SIGTERM as a
  cancel, and whether a dead host's job is over.
- `archive.py`: safe tar extraction.
"""
