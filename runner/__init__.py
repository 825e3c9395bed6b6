"""forge-runner's host side: everything outside the jail. Nothing here runs job code.

Entry points, flat: `api` (train_model_version and its skill), `cli` (`forge`),
`train_app` (`forge-train`, the Hydra app), `sweep` (its sweep callback), `demo`
(`make demo`), `tools` (skills and the tool-call audit), `errors`, `settings`.

Packages, lowest first (import-linter contracts in pyproject.toml keep it so):
- `registry/`: the only code that talks SQL: schema, migrations, catalog, ledger, audit.
- `config/`: Hydra composition of conf/ and the caller boundary (what a caller may set).
- `sandbox/`: the bubblewrap jail: policy, seccomp, supervisor, output hand-off.
- `jobs/`: a request planned, launched, tracked and registered.

The sandbox side is `trainers/`; the two meet only at the run manifest and the files the
job writes (`trainers/manifest.py` is the contract).
"""
