"""`reconcile status [--output text|json]`: each instance's status, as the control loop or
the last one-shot apply that acted on it wrote it (control/status.py). It only reads the
status database; a host where nothing was recorded yet shows no instance. The long steps a
running loop has under way (bytes, percent, rate, time left) follow, as it publishes them."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from collections.abc import Sequence

from reconciler.commands.common import EXIT_OK, human_age, parse, read_config
from reconciler.util.progress import PROGRESS_FILE, SNAPSHOT_FIELDS, Snapshot, read_published


def run(argv: Sequence[str]) -> int:
    from reconciler.control.status import StatusStore

    p = argparse.ArgumentParser(
        prog="reconcile status",
        description="Each instance's status, as the control loop or the last one-shot apply "
        "that acted on it wrote it.",
    )
    p.add_argument("--output", choices=("text", "json"), default="text")
    args = parse(p, argv)
    config = read_config(args)
    path = config.state_dir() / "status.sqlite"
    if not path.exists():
        rows = []
    else:
        store = StatusStore(path)
        try:
            rows = store.all()
        finally:
            store.close()
    # The long steps a running loop has under way (reconciler/util/progress.py).
    running = read_published(config.state_dir() / PROGRESS_FILE)
    if args.output == "json":
        docs = []
        for r in rows:
            doc = r.to_json()
            mine = [t for t in running if t.get("instance") == r.instance]
            if mine:
                doc["progress"] = mine
            docs.append(doc)
        print(json.dumps(docs, indent=2, sort_keys=True))
        return EXIT_OK
    now = datetime.datetime.now(datetime.UTC)
    print(f"{'INSTANCE':<36}  {'READY':<7}  {'DISKS':>5}  {'REASON':<22}  {'AGE':>6}  MESSAGE")
    for r in rows:
        ready = r.condition("Ready")
        age = "-"
        if ready is not None:
            since = datetime.datetime.fromisoformat(ready.lastTransitionTime)
            age = human_age((now - since).total_seconds())
        msg = ready.message if ready else ""
        print(
            f"{r.instance:<36}  {ready.status if ready else '-':<7}  {r.disks:>5}  "
            f"{ready.reason if ready else '-':<22}  {age:>6}  {msg[:80]}"
        )
    print(f"{len(rows)} instance(s)")
    if running:
        print("Under way:")
        for t in running:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                print(f"  {Snapshot(**{k: t[k] for k in SNAPSHOT_FIELDS}).line()}")
    return EXIT_OK
