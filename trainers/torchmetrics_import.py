"""Import torchmetrics, which Lightning imports, without scipy.signal.

torchmetrics' `__init__` (and its two audio packages) import scipy.signal only to alias
`scipy.signal.hamming` for SRMRpy, a package torchmetrics itself never imports (torchmetrics
issue #3457; the fix, PR #3459, is not released). scipy.signal pulls in scipy.stats,
.optimize, .interpolate and more: about 0.65 s of the 3.3 s that `import pytorch_lightning`
takes on a 2-core host (benchmarks/README.md), paid by every Lightning job. No family
computes with scipy.signal.

`import_torchmetrics()` imports torchmetrics while a placeholder stands in for scipy.signal,
holding the alias torchmetrics looks for (so it sets none), then removes the placeholder: a
later `import scipy.signal` loads the real module. Drop this module once the torchmetrics in
the lock file no longer imports scipy.signal.
"""

from __future__ import annotations

import sys
import types


def import_torchmetrics() -> None:
    """Import torchmetrics (before Lightning or scvi-tools does) without scipy.signal."""
    if "torchmetrics" in sys.modules or "scipy.signal" in sys.modules:
        return
    placeholder = types.ModuleType("scipy.signal", "stands in while torchmetrics imports")
    placeholder.hamming = None  # the SRMRpy alias torchmetrics checks for: present already
    sys.modules["scipy.signal"] = placeholder
    try:
        import torchmetrics  # noqa: F401
    finally:
        if sys.modules.get("scipy.signal") is placeholder:
            del sys.modules["scipy.signal"]
        scipy = sys.modules.get("scipy")
        if scipy is not None and vars(scipy).get("signal") is placeholder:
            del scipy.signal
