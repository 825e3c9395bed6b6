"""Eval gates: conf/gate/<name>.yaml, operator-written, read and checked here.

A caller picks a gate by name among the files in conf/gate/ and never changes one: the
name is matched against that list before it touches a path."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config.options import config_dir, group_options
from runner.errors import InvalidConfig, InvalidInput

METRICS = {"test_macro_f1": "macro_f1", "test_accuracy": "accuracy"}  # -> bootstrap metric
COMPARATORS = ("parent", "champion", "benchmark_best")  # gate.py _comparators


@dataclass(frozen=True)
class GateConf:
    metric: str = "test_macro_f1"
    comparators: list[str] = field(default_factory=lambda: ["parent", "champion"])
    min_delta: float = 0.0
    confidence: float = 0.95
    n_resamples: int = 1000
    seed: int = 0
    guards: dict[str, float] = field(default_factory=lambda: {"test_accuracy": 0.01})
    allow_tradeoff: bool = False
    wall_time_cap_min: int = 10

    def to_dict(self) -> dict:
        return asdict(self)

    def sha256(self) -> str:
        """The identity of a gate's rules: the same candidate gated under other rules is
        another decision, and is refused."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def load_gate(name: str) -> GateConf:
    """conf/gate/<name>.yaml over GateConf's defaults, typed and range-checked."""
    options = group_options("gate")
    if not isinstance(name, str) or name not in options:
        raise InvalidInput(f"gate {str(name)[:60]!r} is not one of conf/gate/: "
                           f"{', '.join(options) or '(none)'}", field="gate",
                           fix="pass the name of a gate the operator defined")
    try:
        node = OmegaConf.merge(OmegaConf.structured(GateConf),
                               OmegaConf.load(config_dir() / "gate" / f"{name}.yaml"))
        gate = GateConf(**OmegaConf.to_container(node))
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise InvalidConfig(f"conf/gate/{name}.yaml: {exc}".splitlines()[0], field="gate",
                            fix="fix the gate file (see conf/gate/default.yaml)") from exc
    _check(gate, name)
    return gate


def _check(g: GateConf, name: str) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise InvalidConfig(f"conf/gate/{name}.yaml: {key} {what}", field=f"gate.{key}",
                                fix="fix the gate file (see conf/gate/default.yaml)")

    need(g.metric in METRICS, "metric", f"must be one of {', '.join(METRICS)}")
    need(bool(g.comparators) and all(c in COMPARATORS for c in g.comparators)
         and len(set(g.comparators)) == len(g.comparators), "comparators",
         f"must list some of {', '.join(COMPARATORS)}, once each")
    need(0 < g.confidence < 1, "confidence", "must lie in (0, 1)")
    need(1 <= g.n_resamples <= 100_000, "n_resamples", "must lie in [1, 100000]")
    need(0 <= g.seed < 2**32, "seed", "must lie in [0, 2**32)")
    need(-1 <= g.min_delta <= 1, "min_delta", "must lie in [-1, 1]")
    need(all(k in METRICS and 0 <= v <= 1 for k, v in g.guards.items()), "guards",
         f"must map metrics of {', '.join(METRICS)} to a drop in [0, 1]")
    need(1 <= g.wall_time_cap_min <= 24 * 60, "wall_time_cap_min", "must lie in [1, 1440]")
