"""The training config: conf/ composed with Hydra, on a typed schema, checked at the caller
boundary and validated before anything runs. Import the module you need by name:

- `schema`: the structured-config dataclasses (`TrainConfig` and one per group of conf/;
  `TrainingConf` and `ParentConf` derived from trainers/manifest.py), `register_schema()`,
  and what the schema declares at a path.
- `options`: conf/ on disk: `config_dir()`, `GROUPS`, each group's options,
  `option_for_artifact()`, the installed Hydra launchers.
- `overrides`: override strings: Hydra's `OverridesParser` (`parse_overrides()`), group
  options, sweeps and interpolation refused, and the error text shared by the modules here.
- `caller`: what a caller may set (docs/guides/configuration.md): the allowlist tables and
  caps, `check_caller_overrides()`, `check_caller_dict()`, `cli_overrides()`, the lines the
  host writes for a call (`call_lines()`, `artifact_lines()`), `caller_schema()`.
- `validate`: `validate_config()`: the host's own ranges and the trainer's manifest parser.
- `manifest`: `build_manifest()`, the run manifest the host hands the trainer for a resolved
  config (trainers/manifest.py is the contract).
- `compose`: Hydra's Compose API: `compose_config()`, `compose_resolved()`,
  `merge_config()`, the in-memory and on-disk cache, `check_operator_settings()`,
  `to_plain()`, `explain()` (composition errors as `InvalidOverride`).

Importing any of them imports neither Hydra nor MLflow: a dry run served from the compose
cache never does.
"""
