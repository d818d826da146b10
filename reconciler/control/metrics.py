"""The loop's Prometheus metrics, named as operators know them from controller-runtime.

Owns the registry `reconcile watch --metrics-port` serves and every metric in it; their
names, help texts and labels are an interface (dashboards and alerts use them), so they
do not change. Invariants: `controller_runtime_reconcile_total` is scraped with both of
its results at 0 before the first reconcile; every reconcile counted with result "error"
is also counted in `controller_runtime_reconcile_errors_total`; the gauge of instances
whose Ready is not True is the size of the set kept here, changed under one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from reconciler.util import progress

_STEP_LABELS = ["action", "instance", "disk", "step"]


class StepBytes(Collector):
    """Each long step under way (reconciler/util/progress.py): its bytes done and total,
    read when scraped, so a step that ended is gone from the next scrape."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        done = GaugeMetricFamily(
            "reconcile_step_done_bytes", "Bytes done of a long step under way", labels=_STEP_LABELS
        )
        total = GaugeMetricFamily(
            "reconcile_step_size_bytes", "Bytes in all of a long step under way",
            labels=_STEP_LABELS,
        )  # fmt: skip
        for s in progress.running():
            labels = [s.action, s.instance, s.disk, s.step.split(" ", 1)[0]]
            done.add_metric(labels, s.done)
            total.add_metric(labels, s.total)
        yield done
        yield total


class Metrics:
    """Prometheus metrics, named as operators know them from controller-runtime."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        c = {"controller": "reconcile"}
        self.reconciles = Counter(
            "controller_runtime_reconcile_total",
            "Reconciles by result",
            ["controller", "result"],
            registry=r,
        )
        self.errors = Counter(
            "controller_runtime_reconcile_errors_total",
            "Reconcile errors",
            ["controller"],
            registry=r,
        ).labels(**c)
        self.duration = Histogram(
            "controller_runtime_reconcile_time_seconds",
            "Time per reconcile",
            ["controller"],
            registry=r,
        ).labels(**c)
        q = {"name": "reconcile"}
        self.depth = Gauge("workqueue_depth", "Queue depth", ["name"], registry=r).labels(**q)
        self.adds = Counter("workqueue_adds_total", "Adds", ["name"], registry=r).labels(**q)
        self.retries = Counter("workqueue_retries_total", "Retries", ["name"], registry=r).labels(
            **q
        )
        self.queue_time = Histogram(
            "workqueue_queue_duration_seconds", "Time in the queue", ["name"], registry=r
        ).labels(**q)
        self.work_time = Histogram(
            "workqueue_work_duration_seconds", "Time worked", ["name"], registry=r
        ).labels(**q)
        self.actions = Counter(
            "reconcile_actions_total", "Actions applied", ["kind", "outcome"], registry=r
        )
        self.drift = Counter("reconcile_drift_total", "Drift found by resyncs", registry=r)
        self.not_ready = Gauge(
            "reconcile_instances_not_ready", "Instances whose Ready is not True", registry=r
        )
        self.resyncs = Counter("reconcile_resyncs_total", "Resyncs done", registry=r)
        r.register(StepBytes())
        for label in ("success", "error"):  # scraped as 0 before the first of each
            self.reconciles.labels("reconcile", label)
        self._not_ready: set[str] = set()  # instances whose Ready is not True
        self._not_ready_lock = threading.Lock()

    def reconciled(self, label: str) -> None:
        """Count one reconcile by its result label: every "error" is also an error, so
        the two counters controller-runtime keeps always agree."""
        self.reconciles.labels("reconcile", label).inc()
        if label == "error":
            self.errors.inc()

    def start(self, not_ready: Iterable[str]) -> None:
        """The instances whose status, as the loop starts, is not Ready (the gauge
        follows at the first status written)."""
        with self._not_ready_lock:
            self._not_ready = set(not_ready)

    def readiness(self, ready: Iterable[tuple[str, bool]]) -> None:
        """Note whether each instance is Ready."""
        with self._not_ready_lock:
            for instance, is_ready in ready:
                if is_ready:
                    self._not_ready.discard(instance)
                else:
                    self._not_ready.add(instance)
            self.not_ready.set(len(self._not_ready))

    def gone(self, instance: str) -> None:
        """An instance with neither manifest nor disk: no longer counted."""
        self.readiness([(instance, True)])
