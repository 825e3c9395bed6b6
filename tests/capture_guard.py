"""pytest's capture files stay open for the whole session.

pytest sends each worker's stdout and stderr to two files for the whole session. Code under
test that closes one of them (`sys.stderr.close()`, or a text wrapper made over
`sys.stdout.buffer` and then garbage-collected, which closes the buffer it wraps) broke every
later test of that worker at setup with "ValueError: I/O operation on closed file": one CI
run reported 1 failure and 1,341 such errors, all from one xdist worker. The files now
refuse to close; each attempt is reported as a warning carrying the stack that tried, on the
test it happened in, and the session goes on.

The closer seen so far: absl-py's logging handler (imported with scvi-tools) keeps the
`sys.stderr` of its import, pytest's capture file; the first `import submitit` in a worker
runs `logging.config.dictConfig`, which closes every handler, and absl's closes that stream
when `sys.stderr` is by then another object (a CliRunner's or capsys's stream).
"""

from __future__ import annotations

import traceback
import warnings

import pytest

_attempts: list[str] = []


class CaptureFileCloseRefused(pytest.PytestWarning):
    """Code under test tried to close one of pytest's capture files."""


def _refuse_close(stream) -> None:
    def close() -> None:
        _attempts.append("".join(traceback.format_stack(limit=30)[:-1]))

    try:
        stream.close = close
    except (AttributeError, TypeError):  # a stream type that takes no attributes: left as is
        pass


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    capman = config.pluginmanager.getplugin("capturemanager")
    capturing = getattr(capman, "_global_capturing", None)  # None under -s
    for capture in (getattr(capturing, "out", None), getattr(capturing, "err", None)):
        stream = getattr(capture, "tmpfile", None)
        if stream is not None:
            _refuse_close(stream)
            _refuse_close(getattr(stream, "buffer", None))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Inside the test's own warnings capture: the warning is the test's (an attempt made in
    a later phase, by garbage collection, is reported on the next test)."""
    while _attempts:
        warnings.warn(CaptureFileCloseRefused(
            f"code under test closed a capture file of pytest's; the close was refused. "
            f"It was closed from:\n{_attempts.pop(0)}"), stacklevel=1)
