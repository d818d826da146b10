"""Fuzzing what others can write (DESIGN invariant 8) through the command line: manifests,
saved plans, exported states and a Nova disk.info, each as structured mutations of a real
one and as byte-level garbage. Whatever the input, a run ends in its exit code (0, 1 or 2)
with no traceback and no internal error, and changes nothing: the state directory's files
and the pool's volumes (bytes and extended attributes) are as they were.

Runs in this process through reconciler.commands.cli.main (fast); an exception escaping main fails
the example, and fd-level capture sees what a child process or a thread wrote. The number
of examples is bounded (about 200 in all) so the suite stays fast; a failure prints the
input hypothesis found, and `--hypothesis-seed` reproduces a run."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from reconciler.commands.cli import main
from tests.env import Env, disk
from tests.helpers import EXAMPLES, ROOT
from tests.test_edge import apply_argv

pytestmark = [
    pytest.mark.libvirtd,
    # a failing example of 100,000 nested brackets is printed whole, on purpose
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

# Examples per target, about 200 in all (RECONCILER_FUZZ_EXAMPLES=N: N per target, for a
# longer search by hand).
FUZZ_EXAMPLES = os.environ.get("RECONCILER_FUZZ_EXAMPLES")
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    # CI (CI=true) runs the same examples every time, so a red CI is a finding that
    # reproduces; by hand each run searches afresh.
    derandomize=bool(os.environ.get("CI")),
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

# Strings that have steered parsers before: paths out of the pool, numbers past every
# limit, encodings, names of real formats and backends, control characters.
NASTY = [
    "",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/dev/zero",
    "..",
    "a/../../b",
    "\x00",
    "\ud800",
    "\u202e\u0000",
    "a" * 5000,
    "9" * 400,
    "1e400",
    "-1",
    "0x10",
    "NaN",
    "raw",
    "qcow2",
    "ploop",
    "flat",
    "lvm",
    "rbd",
    "local",
    "Delete",
    "Retain",
    "1MiB",
    "64TiB",
    "00000000-0000-0000-0000-000000000000",
    "{{ x }}",
    "%s%n",
]

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(NASTY)
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)

DEEP = "\x00deep\x00"  # replaced after serialising by nesting no serialiser would write


def _paths(doc: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield here
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*here, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*here, i))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated_tree(draw: st.DrawFn, seed: Any) -> Any:
    """A copy of `seed` (parsed JSON or YAML) with one to three changes: a key removed, a
    value replaced (by any JSON value, often a nasty one), its type changed, an item
    repeated, or nesting far deeper than any real document."""
    doc = json.loads(json.dumps(seed, default=str))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["delete", "replace", "retype", "repeat", "deep"]))
        if not path:
            if op in ("replace", "retype"):
                doc = draw(JSONISH)
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        value = parent[key]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(JSONISH)
        elif op == "retype":
            parent[key] = draw(
                st.sampled_from([[value], {"x": value}, str(value), 0, None, True, -1, 1.5])
            )
        elif op == "repeat" and isinstance(parent, list):
            parent.insert(key, value)
        elif op == "repeat" and isinstance(parent, dict):
            parent[f"{key}"] = value
            parent[f"{key} "] = value
        else:
            parent[key] = DEEP
    return doc


def _deepen(text: str, depth: int, quoted: str) -> str:
    return text.replace(quoted, "[" * depth + "]" * depth)


@st.composite
def json_input(draw: st.DrawFn, seed_text: str) -> bytes:
    """A structured mutation of a JSON document, or byte-level garbage made from it."""
    if draw(st.integers(0, 3)) == 0:
        return draw(garbage(seed_text.encode()))
    doc = draw(mutated_tree(json.loads(seed_text)))
    text = json.dumps(doc)  # NaN and Infinity too, as Python's json reads them
    depth = draw(st.sampled_from([64, 1000, 100_000]))
    out = _deepen(text, depth, json.dumps(DEEP))
    enc = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1"]))
    return out.encode(enc, "surrogatepass" if enc.startswith("utf") else "replace")


YAML_SNIPPETS = [
    "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: &d [*c, *c]\ne: [*d, *d, *d, *d]\n",
    "x: !!python/object/apply:os.system ['true']\n",
    "instance: !!binary aGVsbG8=\n",
    "\t- tab\n",
    "\ufeffapiVersion: reconciler/v1\n",
    "disks: 1\ndisks: 2\n",
    "---\n---\n",
    "%YAML 1.1\n---\n",
    "? [a, b]\n: c\n",
    "<<: {size: 1}\n",
    "size: 1e309\n",
    "size: !!int 0x7fffffffffffffffffff\n",
    "size: .inf\n",
    "\x85\u2028\u2029\n",
    "key: 'unterminated\n",
    "[" * 5000 + "]" * 5000 + "\n",
    "{" * 200 + "}" * 200 + "\n",
]


@st.composite
def yaml_input(draw: st.DrawFn, seed_text: str) -> bytes:
    """A structured mutation of a manifest (as YAML or as JSON, which is YAML), a YAML
    snippet that has broken loaders dropped into it, or byte-level garbage."""
    try:
        seed = yaml.safe_load(seed_text)
    except yaml.YAMLError:  # some corpus files are not YAML at all: mutate their text
        seed = None
    how = draw(st.integers(0, 3 if seed is not None else 1))
    if how == 0:
        return draw(garbage(seed_text.encode()))
    if how == 1:
        lines = seed_text.splitlines(keepends=True)
        at = draw(st.integers(0, len(lines)))
        snippet = draw(st.sampled_from(YAML_SNIPPETS))
        replace = draw(st.booleans()) and at < len(lines)
        return "".join([*lines[:at], snippet, *lines[at + int(replace) :]]).encode()
    doc = draw(mutated_tree(seed))
    if draw(st.booleans()):
        text = json.dumps(doc)
        quoted = json.dumps(DEEP)
    else:
        text = yaml.safe_dump(doc, allow_unicode=True, default_flow_style=None)
        quoted = yaml.safe_dump(DEEP).strip().removesuffix("...").strip()
    depth = draw(st.sampled_from([64, 1000, 100_000]))
    return _deepen(text, depth, quoted).encode("utf-8", "surrogatepass")


@st.composite
def garbage(draw: st.DrawFn, seed: bytes) -> bytes:
    """Bytes: random, or the real input truncated, with bytes flipped or inserted."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=2048))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert"]))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# -- the host the inputs are given to ---------------------------------------------------


@dataclass
class World:
    """A host with records and volumes made by real runs, and the real inputs made there:
    a saved plan (stale by now: it was applied), an exported state, a Nova disk.info."""

    env: Env
    work: Path  # where each example's input is written
    tracebacks: Path  # $TMPDIR: an internal error's traceback file would appear here
    plan: Path
    state: Path
    nova: Path
    nova_disk_info: Path
    nova_out: Path

    def snapshot(self) -> dict[str, Any]:
        """What must not change: every file of the state dir, the pool, the Nova host and
        import-nova's --out (names, bytes, modes, extended attributes)."""
        roots = [self.env.root / "state", self.env.pool_dir(), self.nova, self.nova_out]
        return {str(r): _tree(r) for r in roots}


def _tree(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        entry: dict[str, Any] = {"mode": st_.st_mode}
        if p.is_file() and not p.is_symlink():
            entry["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
            entry["xattrs"] = {
                n: os.getxattr(p, n, follow_symlinks=False).hex()
                for n in sorted(os.listxattr(p, follow_symlinks=False))
            }
        out[str(p.relative_to(root))] = entry
    return out


IMAGES = {
    "tiny-linux": {
        "location": "file:///nonexistent/tiny-linux.raw",
        "format": "raw",
        "sha256": "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58",
        "size": 1048576,
    }
}


def _ok(env: Env, *argv: str) -> str:
    rc, out, err = env.main(list(argv))
    assert rc == 0, out + err
    return out


def _world(env: Env, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    env.images = IMAGES
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    cfg = str(env.config_path)
    a = env.manifest("a", [disk("d", size="1MiB")])
    env.manifest("b", [disk("d", backend="qcow2", fmt="qcow2", size="1MiB")])
    _ok(env, "--config", cfg, str(env.manifests))
    # A plan that grows one disk, deletes another instance's and makes a third.
    env.manifest("a", [disk("d", size="2MiB")], instance=a)
    env.remove_manifest("b")
    env.manifest("c", [disk("d", size="1MiB")])
    plan = tmp / "plan.json"
    _ok(env, "--config", cfg, "--dry-run", "--prune", "--plan-out", str(plan), str(env.manifests))
    assert {a["action"] for a in json.loads(plan.read_text())["actions"]} >= {"create", "delete"}
    _ok(env, *apply_argv(env, plan, "--prune"))  # from now on every precondition in it is stale
    state = tmp / "state.json"
    _ok(env, "observe", "--config", cfg, "--out", str(state))

    nova = tmp / "nova"
    inst = nova / str(uuid.uuid5(uuid.NAMESPACE_DNS, "nova"))
    inst.mkdir(parents=True)
    (nova / "_base").mkdir()
    for name in ("disk", "disk.local"):
        (inst / name).write_bytes(b"\0" * (1 << 20))
    info = inst / "disk.info"
    info.write_text(json.dumps({str(inst / "disk"): "raw", str(inst / "disk.local"): "raw"}))

    tracebacks = tmp / "tracebacks"
    tracebacks.mkdir()
    monkeypatch.setenv("TMPDIR", str(tracebacks))
    work = tmp / "fuzz"
    work.mkdir()
    return World(env, work, tracebacks, plan, state, nova, info, tmp / "nova-out")


def _main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr as a process has them (bytes underneath, stdout
    strict UTF-8, stderr backslashreplace), not as StringIO, which takes any string: a
    lone surrogate from an input must not be able to break the output."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", newline="")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    texts = []
    for stream in (out, err):
        stream.flush()
        buffer = stream.buffer
        assert isinstance(buffer, io.BytesIO)
        texts.append(buffer.getvalue().decode("utf-8", "backslashreplace"))
    return rc, texts[0], texts[1]


def _event(text: str) -> None:
    """hypothesis' event(), where a fixed-input test calls _run outside any @given."""
    if currently_in_test_context():
        event(text)


def _run(
    world: World,
    capfd: pytest.CaptureFixture[str],
    argv: list[str],
    what: bytes,
    known: tuple[str, ...],
) -> None:
    """One run on one input: no traceback, no internal error (but those of the `known`
    types, or RECONCILER_FUZZ_KNOWN's, to look past a finding by hand), exit 0, 1 or 2."""
    before = set(world.tracebacks.iterdir())
    try:
        rc, out, err = _main(argv)
    except SystemExit as e:  # pragma: no cover - a failure to report, not to pass
        pytest.fail(f"SystemExit({e.code}) escaped main for {argv}; input {what!r:.2000}")
    fd = capfd.readouterr()
    everything = out + err + fd.out + fd.err
    made = set(world.tracebacks.iterdir()) - before
    for p in made:  # for the next example: each is judged on its own
        p.unlink()
    said = f"{argv}\ninput {what!r:.2000}\n{everything}"
    explore = os.environ.get("RECONCILER_FUZZ_KNOWN", "")  # to look past a failure found
    for name in (*known, *filter(None, explore.split(","))):
        if f"reconcile: internal error: {name}:" in err and len(made) == 1:
            assert rc == 1 and "Traceback" not in everything, said
            _event(f"{argv[0]}: known {name}")
            return
    assert "Traceback" not in everything, said
    assert "internal error" not in everything, said
    assert rc in (0, 1, 2), f"rc {rc}\n{said}"
    assert not made, said
    _event(f"{argv[0]}: exit {rc}")  # --hypothesis-show-statistics: what the inputs reached


def _seed_manifests(pool: str = "local") -> list[str]:
    seeds = [
        p.read_text()
        .replace("pool: demo-fast", f"pool: {pool}")
        .replace("pool: demo", f"pool: {pool}")
        for p in sorted((EXAMPLES / "manifests").glob("*.yaml"))
    ]
    corpus = sorted((ROOT / "tests" / "corpus" / "manifests").glob("*.yaml"))
    seeds += [p.read_text() for p in corpus[:: max(1, len(corpus) // 12)]]
    return seeds


# -- the targets --------------------------------------------------------------------------


def _fuzz(
    world: World,
    capfd: pytest.CaptureFixture[str],
    inputs: st.SearchStrategy[bytes],
    argvs: Callable[[bytes], list[list[str]]],
    known: tuple[str, ...] = (),
    leave_out: Path | None = None,
    examples: int = 50,
) -> None:
    """Run every argv of each input; then nothing of the host has changed, but
    `leave_out` (the input file itself, where it lives on the host) and the manifest
    cache: a cache of parsed manifests keyed by their files' identity, which every plan,
    a dry run's too, may rewrite (a manifest is cached once it is two seconds old), and
    from which no decision is taken that the file itself would not give. The same holds
    for the header caches (drivers/file/headercache.py: what each volume's first bytes
    announced, for warnings only) and the judged rows (drivers/host/checked.py)."""
    state = world.env.root / "state"
    caches = ("header-cache-", "records-checked.bin")

    def snapshot() -> dict[str, Any]:
        snap = world.snapshot()
        for path in (leave_out, state / "manifest-cache.json"):
            for root, files in snap.items():
                if path is not None and path.is_relative_to(root):
                    files.pop(str(path.relative_to(root)), None)
        for root, files in snap.items():
            if state.is_relative_to(root):
                inside = state.relative_to(root)
                for name in [n for n in files if Path(n).parent == inside]:
                    if Path(name).name.startswith(caches):
                        files.pop(name)
        return snap

    capfd.readouterr()

    @settings(SETTINGS, max_examples=int(FUZZ_EXAMPLES or examples))
    @given(inputs)
    def one(data: bytes) -> None:
        # Before each example, not once: an example is judged on what it did itself.
        before = snapshot()
        for argv in argvs(data):
            _run(world, capfd, argv, data, known)
        after = snapshot()
        changed = sorted(
            f"{root}/{name}"
            for root in before
            for name in set(before[root]) | set(after[root])
            if before[root].get(name) != after[root].get(name)
        )
        assert not changed, f"input {data!r:.2000} changed the host: {changed}"

    one()


def test_fuzz_manifests(
    env: Env, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifests: `validate`, a dry run against the exported state, and one against the
    pools themselves (with --prune: every disk the fuzzed manifest does not name is
    planned for deletion, which a dry run must still not do)."""
    world = _world(env, tmp_path, monkeypatch)
    seeds = _seed_manifests()
    inputs = st.sampled_from(seeds).flatmap(yaml_input)
    cfg = str(env.config_path)
    mdir = world.work / "manifests"
    mdir.mkdir()

    def argvs(data: bytes) -> list[list[str]]:
        (mdir / "fuzzed.yaml").write_bytes(data)
        return [
            ["validate", "--config", cfg, str(mdir)],
            ["--config", cfg, "--dry-run", "--observed", str(world.state), str(mdir)],
            ["--config", cfg, "--dry-run", "--prune", str(mdir)],  # the live daemon's pools
        ]

    _fuzz(world, capfd, inputs, argvs)


def test_fuzz_saved_plans(
    env: Env,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Saved plans: `reconcile apply PLAN` on a real plan (stale: it was applied) mutated."""
    world = _world(env, tmp_path, monkeypatch)
    inputs = json_input(world.plan.read_text())
    fuzzed = world.work / "plan.json"

    def argvs(data: bytes) -> list[list[str]]:
        fuzzed.write_bytes(data)
        return [apply_argv(world.env, fuzzed, "--prune")]

    _fuzz(world, capfd, inputs, argvs)


def test_fuzz_exported_states(
    env: Env,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exported states: a dry run with `--observed STATE`, as .json, as .json.gz, and as
    a gzip stream cut short."""
    world = _world(env, tmp_path, monkeypatch)
    inputs = json_input(world.state.read_text())
    cfg = str(env.config_path)

    def argvs(data: bytes) -> list[list[str]]:
        plain = world.work / "state.json"
        plain.write_bytes(data)
        packed = world.work / "state.json.gz"
        packed.write_bytes(gzip.compress(data, mtime=0))
        cut = world.work / "cut.json.gz"
        cut.write_bytes(packed.read_bytes()[: max(1, len(data) // 3)])
        return [
            ["--config", cfg, "--dry-run", "--observed", str(p), str(env.manifests)]
            for p in (plain, packed, cut)
        ]

    _fuzz(world, capfd, inputs, argvs, examples=50)


def test_fuzz_disk_info(
    env: Env,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Nova instance's disk.info: `import-nova --dry-run`."""
    world = _world(env, tmp_path, monkeypatch)
    cfg = str(env.config_path)
    inputs = json_input(world.nova_disk_info.read_text())

    def argvs(data: bytes) -> list[list[str]]:
        world.nova_disk_info.write_bytes(data)
        return [
            [
                "import-nova",
                "--config",
                cfg,
                "--instances-path",
                str(world.nova),
                "--images-type",
                "raw",
                "--pool",
                "local",
                "--out",
                str(world.nova_out),
                "--dry-run",
            ]
        ]

    _fuzz(world, capfd, inputs, argvs, leave_out=world.nova_disk_info)


def test_a_state_whose_record_spec_lacks_backend_is_one_clear_error(
    env: Env, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure the exported-state target found, as one fixed input."""
    world = _world(env, tmp_path, monkeypatch)
    doc = json.loads(world.state.read_text())
    del doc["records"][0]["spec"]["backend"]
    data = json.dumps(doc).encode()
    bad = world.work / "state.json"
    bad.write_bytes(data)
    argv = ["--config", str(env.config_path), "--dry-run", "--observed", str(bad)]
    _run(world, capfd, [*argv, str(env.manifests)], data, ())
