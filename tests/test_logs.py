"""reconciler.util.logs: structlog is imported only when a line is emitted, lines below the
configured level are dropped before that, and a configured run logs as before."""

from __future__ import annotations

import json
import subprocess
import sys

from structlog.testing import capture_logs

from reconciler.util import logs

CHILD = r"""
import json, sys
from reconciler.util import logs
log = logs.get_logger("t")
logs.configure(logs.WARNING, json_lines=JSON)
log.info("dropped", n=1)
log.debug("dropped too")
before = "structlog" in sys.modules
log.warning("kept", n=2)
try:
    raise ValueError("boom")
except ValueError:
    log.exception("failed", n=3)
print(json.dumps({"before": before, "after": "structlog" in sys.modules}))
"""


def child(json_lines: bool) -> tuple[dict[str, bool], list[str]]:
    res = subprocess.run(
        [sys.executable, "-c", CHILD.replace("JSON", str(json_lines))],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout), res.stderr.splitlines()


def test_structlog_is_imported_by_the_first_line_emitted() -> None:
    seen, err = child(json_lines=False)
    assert seen == {"before": False, "after": True}
    text = "\n".join(err)
    assert "dropped" not in text
    assert "kept" in text and "n=2" in text and "[warning  ]" in text
    assert "failed" in text and "ValueError: boom" in text  # the traceback, formatted


def test_json_lines_off_a_terminal() -> None:
    _, err = child(json_lines=True)
    lines = [json.loads(line) for line in err if line.startswith("{")]
    assert [(x["event"], x["level"], x["n"]) for x in lines] == [
        ("kept", "warning", 2),
        ("failed", "error", 3),
    ]
    assert "ValueError: boom" in lines[1]["exception"]
    assert all("timestamp" in x for x in lines)


def test_capture_logs_sees_what_the_configured_level_lets_through() -> None:
    log = logs.get_logger("t")
    try:
        logs.configure(logs.INFO)  # structlog is loaded here: applied at once
        with capture_logs() as captured:
            log.debug("below", n=0)
            log.info("at", n=1)
            log.error("above", n=2)
        assert [(c["event"], c["log_level"]) for c in captured] == [
            ("at", "info"),
            ("above", "error"),
        ]
    finally:
        logs.configure(logs.WARNING)
