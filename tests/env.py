"""A reconciler environment on a real libvirt pool: config, manifests, running the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen  # the name `subprocess` is also a method below
from typing import Any

from reconciler.commands.cli import main
from reconciler.drivers.host.store import SqliteRecordStore, open_store
from reconciler.schema.load import load_config

ROOT = Path(__file__).resolve().parent.parent
_in_process = threading.Lock()  # Env.main, for tests that run kill points side by side


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m reconciler ARGS` as a separate process, from the repository's root."""
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def qemu_uri(uri: str) -> str:
    """The private daemon serves storage and domains; domain checks need the qemu driver."""
    return uri.replace("storage+unix://", "qemu+unix://", 1)


def disk(
    name: str,
    *,
    backend: str = "flat",
    fmt: str = "raw",
    size: str | int = "64MiB",
    template: str | None = "blank",
    label: str | None = None,
    image: str | None = None,
    pool: str = "local",
    policy: str | None = None,
) -> dict[str, Any]:
    source: dict[str, Any] = {"image": image} if image else {"template": template}
    if label:
        source["label"] = label
    d: dict[str, Any] = {
        "name": name,
        "backend": backend,
        "pool": pool,
        "format": fmt,
        "size": size,
        "source": source,
    }
    if policy:
        d["deletionPolicy"] = policy
    return d


@dataclass
class Env:
    root: Path
    uri: str
    pools: dict[str, tuple[str, Path]]  # config name -> (libvirt pool name, directory)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    uris: dict[str, str] = field(default_factory=dict)  # pool -> its daemon, if not `uri`
    safety: dict[str, Any] = field(default_factory=dict)
    libvirt: dict[str, Any] = field(default_factory=dict)
    backends: list[str] = field(default_factory=lambda: ["flat", "qcow2"])  # of every pool
    # Pools that are LVM volume groups: pool -> its `lvm` config section (backends [lvm]).
    lvm: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_pools: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> config
    host: str | None = None  # the config's host identity
    ownership: dict[str, Any] = field(default_factory=dict)  # the config's ownership section

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    def write_config(self) -> None:
        pools: dict[str, dict[str, Any]] = {
            name: {
                "uri": self.uris.get(name, self.uri),
                "libvirtPool": lp,
                "backends": list(self.backends),
            }
            for name, (lp, _) in self.pools.items()
        }
        for name, section in self.lvm.items():
            pools[name]["backends"] = ["lvm"]
            pools[name]["lvm"] = section
        pools.update(self.extra_pools)
        cfg = {
            "apiVersion": "reconciler/v1",
            "kind": "Config",
            "state": {"dir": str(self.root / "state")},
            "pools": pools,
            "images": self.images,
        }
        if self.host:
            cfg["host"] = self.host
        if self.ownership:
            cfg["ownership"] = self.ownership
        if self.safety:
            cfg["safety"] = self.safety
        if self.libvirt:
            cfg["libvirt"] = self.libvirt
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML

    def manifest(
        self,
        name: str,
        disks: list[dict[str, Any]],
        *,
        instance: str | None = None,
        deleted: bool = False,
    ) -> str:
        inst = instance or str(uuid.uuid5(uuid.NAMESPACE_DNS, name))
        doc: dict[str, Any] = {
            "apiVersion": "reconciler/v1",
            "kind": "InstanceStorage",
            "instance": inst,
        }
        if deleted:
            doc["deleted"] = True
        if disks:
            doc["disks"] = disks
        (self.manifests / f"{name}.yaml").write_text(json.dumps(doc, indent=2))
        return inst

    def remove_manifest(self, name: str) -> None:
        (self.manifests / f"{name}.yaml").unlink()

    def pool_dir(self, name: str = "local") -> Path:
        return self.pools[name][1]

    def volume(self, instance: str, disk_name: str, pool: str = "local") -> Path:
        return self.pool_dir(pool) / f"{instance}_{disk_name}"

    def store(self) -> SqliteRecordStore:
        return open_store(load_config(str(self.config_path)).state_dir())

    def run(self, *args: str) -> tuple[int, str, str]:
        """Run `reconcile --config CFG ARGS MANIFESTS` in this process: (rc, stdout, stderr)."""
        return self.main(["--config", str(self.config_path), *args, str(self.manifests)])

    @staticmethod
    def main(argv: list[str]) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        # One at a time: redirect_stdout swaps the process's sys.stdout, and the CLI sets
        # process-wide state (logging, the garbage collector) for its run.
        with _in_process, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
        return rc, out.getvalue(), err.getvalue()

    def plan_json(self, *flags: str) -> dict[str, Any]:
        rc, out, err = self.run("--dry-run", "--output", "json", *flags)
        assert rc in (0, 1, 2), err
        doc: dict[str, Any] = json.loads(out)
        return doc

    def argv(self, *args: str) -> list[str]:
        """`reconcile --config CFG ARGS MANIFESTS` as a separate Python process."""
        return [
            sys.executable,
            "-m",
            "reconciler",
            "--config",
            str(self.config_path),
            *args,
            str(self.manifests),
        ]

    def subprocess(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=ROOT,
        )

    def traced_steps(self, *args: str) -> list[str]:
        """Run `reconcile ARGS` as a separate process that must succeed, tracing its step
        boundaries (RECONCILER_TRACE_STEPS): their names in order; the Nth is where
        RECONCILER_CRASH_AT=N kills a run of the same scenario (with --jobs 1)."""
        trace = self.root / f"steps-{uuid.uuid4().hex[:8]}.txt"
        res = self.subprocess(*args, env={"RECONCILER_TRACE_STEPS": str(trace)})
        assert res.returncode == 0, res.stdout + res.stderr
        return [line.split()[1] for line in trace.read_text().splitlines()]

    def start(self, *args: str, env: dict[str, str] | None = None) -> Popen[str]:
        """Start `reconcile` in a separate process, its output captured, without waiting."""
        return Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )

    def start_watch(self, log: Path, *args: str) -> Popen[bytes]:
        """Start `reconcile watch` on this env's manifests, its output appended to `log`."""
        with open(log, "ab") as out:
            return Popen(
                [
                    sys.executable,
                    "-m",
                    "reconciler",
                    "watch",
                    "--config",
                    str(self.config_path),
                    *args,
                    str(self.manifests),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
