"""The malformed-input corpus: every bad manifest and config fails where it should.

Each file in tests/corpus/manifests and tests/corpus/configs is paired, in
tests/corpus/expected.yaml, with the line, field and message its error must name. Entries
with an `xfail` reason describe what the loader should do but does not yet; they are
strict xfails, so fixing the loader turns them into failures until the mark is removed.
Inputs too large to commit (over 1 MiB, thousands of levels deep) are generated here.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.model.errors import ConfigError, InputError
from reconciler.schema.config import Config
from reconciler.schema.load import FailedManifest, LoadedManifest, load_config, load_manifest
from reconciler.schema.manifestdir import load_manifests
from reconciler.schema.yamlload import MAX_DEPTH, MAX_FILE_BYTES, load_file

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
EXPECTED = CORPUS / "expected.yaml"
KINDS = ("manifests", "configs")
MIN_COUNTS = {"manifests": 100, "configs": 15}
_FILE_RE = re.compile(r"^[0-9]{3}-[a-z0-9][a-z0-9-]*\.yaml$")


@dataclass(frozen=True)
class Expectation:
    file: str  # relative to CORPUS, e.g. "manifests/001-lvm-holds-qcow2.yaml"
    line: int
    field: str | None
    message: str  # a plain substring of the error message
    xfail: str | None = None

    @property
    def path(self) -> str:
        return str(CORPUS / self.file)


def _load_expected() -> dict[str, Expectation]:
    raw: Any = yaml.safe_load(EXPECTED.read_text(encoding="utf-8"))
    assert isinstance(raw, dict), f"{EXPECTED} must hold a mapping"
    out: dict[str, Expectation] = {}
    for key, entry in raw.items():
        assert isinstance(entry, dict), f"{key}: expectation must be a mapping"
        unknown = set(entry) - {"line", "field", "message", "xfail"}
        assert not unknown, f"{key}: unknown keys {sorted(unknown)}"
        line, field, message = entry.get("line"), entry.get("field"), entry.get("message")
        xfail = entry.get("xfail")
        assert isinstance(line, int) and line >= 1, f"{key}: line must be a positive int"
        assert field is None or isinstance(field, str), f"{key}: field must be str or null"
        assert isinstance(message, str) and message, f"{key}: message must be a string"
        assert xfail is None or isinstance(xfail, str), f"{key}: xfail must be a reason"
        out[str(key)] = Expectation(str(key), line, field, message, xfail)
    return out


EXPECTATIONS = _load_expected()


def _params(kind: str) -> list[Any]:
    params = []
    for key, exp in EXPECTATIONS.items():
        if not key.startswith(f"{kind}/"):
            continue
        marks = [pytest.mark.xfail(strict=True, reason=exp.xfail)] if exp.xfail else []
        params.append(pytest.param(exp, id=Path(key).name, marks=marks))
    return params


@pytest.fixture(scope="module")
def corpus_config() -> Config:
    return load_config(str(CORPUS / "config.yaml"))


def _describe(e: InputError) -> str:
    return f"line={e.location.line} field={e.field!r} message={e.message!r}"


def _matches(e: InputError, path: str, line: int | None, field: str | None, message: str) -> bool:
    return (
        e.location.file == path
        and e.location.line == line
        and e.field == field
        and message in e.message
    )


def _assert_fails_with(
    result: LoadedManifest | FailedManifest,
    path: str,
    line: int | None,
    field: str | None,
    message: str,
) -> None:
    assert isinstance(result, FailedManifest), f"{path} loaded without an error"
    assert result.file == path
    want = f"line={line} field={field!r} message containing {message!r}"
    got = "\n  ".join(_describe(e) for e in result.errors)
    assert any(_matches(e, path, line, field, message) for e in result.errors), (
        f"{path}\nexpected: {want}\ngot:\n  {got}"
    )


# ---------------------------------------------------------------- the corpus itself


def test_every_corpus_file_has_an_expectation_and_vice_versa() -> None:
    on_disk = {
        f"{kind}/{p.name}" for kind in KINDS for p in (CORPUS / kind).iterdir() if p.is_file()
    }
    expected = set(EXPECTATIONS)
    assert sorted(on_disk - expected) == [], "corpus files without an expectation"
    assert sorted(expected - on_disk) == [], "expectations without a corpus file"
    for key in on_disk:
        assert key.split("/")[0] in KINDS
        assert _FILE_RE.match(Path(key).name), f"{key}: name it NNN-short-name.yaml"
    for kind, minimum in MIN_COUNTS.items():
        count = sum(1 for key in expected if key.startswith(f"{kind}/"))
        assert count >= minimum, f"only {count} {kind} in the corpus; want {minimum}"


def test_corpus_numbers_are_unique() -> None:
    for kind in KINDS:
        numbers = [p.name[:3] for p in (CORPUS / kind).iterdir()]
        assert len(numbers) == len(set(numbers)), f"{kind}: a number is used twice"


def test_corpus_config_is_the_documented_one(corpus_config: Config) -> None:
    backends = {name: [b.value for b in p.backends] for name, p in corpus_config.pools.items()}
    assert backends == {
        "local": ["flat", "qcow2"],
        "fast": ["flat"],
        "ceph": ["rbd"],
        "vg": ["lvm"],
    }
    images = {name: (i.format.value, i.size) for name, i in corpus_config.images.items()}
    assert images == {"cirros": ("raw", 1 << 30), "ubuntu": ("qcow2", 629145600)}


def test_valid_corpus_manifests_load(corpus_config: Config) -> None:
    """Positive controls: the bad files fail for their one defect, not for the setup."""
    loaded, failed = load_manifests([str(CORPUS / "valid")], corpus_config)
    assert [f.errors for f in failed] == []
    assert len(loaded) == len(list((CORPUS / "valid").iterdir()))


@pytest.mark.parametrize("exp", _params("manifests"))
def test_bad_manifest(exp: Expectation, corpus_config: Config) -> None:
    result = load_manifest(exp.path, corpus_config)
    _assert_fails_with(result, exp.path, exp.line, exp.field, exp.message)


@pytest.mark.parametrize("exp", _params("configs"))
def test_bad_config(exp: Expectation) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(exp.path)
    text = str(info.value)
    # Each error is one line: <path>:<line>[:<column>]: [<field>: ]<message>
    line_re = re.compile(rf"^{re.escape(exp.path)}:(?P<line>[0-9]+)(?::[0-9]+)?: (?P<rest>.*)$")
    prefix = f"{exp.field}: " if exp.field is not None else ""
    for row in text.splitlines():
        m = line_re.match(row)
        if not m or int(m["line"]) != exp.line:
            continue
        rest = m["rest"]
        if rest.startswith(prefix) and exp.message in rest[len(prefix) :]:
            return
    pytest.fail(
        f"expected {exp.path}:{exp.line}: {prefix}...{exp.message}...\ngot:\n{text}",
        pytrace=False,
    )


# ---------------------------------------------------------------- generated inputs


def _valid_manifest() -> str:
    return (CORPUS / "valid" / "web.yaml").read_text(encoding="utf-8")


def test_manifest_over_one_mib_is_refused(tmp_path: Path, corpus_config: Config) -> None:
    body = _valid_manifest()
    path = tmp_path / "huge.yaml"
    path.write_text(body + "#" * (MAX_FILE_BYTES - len(body.encode())) + "\n", encoding="utf-8")
    assert path.stat().st_size == MAX_FILE_BYTES + 1
    result = load_manifest(str(path), corpus_config)
    assert isinstance(result, FailedManifest)
    (err,) = result.errors
    assert err.location.file == str(path)
    assert err.location.line in (None, 1)
    assert err.field is None
    assert f"{MAX_FILE_BYTES + 1} bytes, more than the {MAX_FILE_BYTES} allowed" in err.message


def test_manifest_of_exactly_one_mib_loads(tmp_path: Path, corpus_config: Config) -> None:
    body = _valid_manifest()
    path = tmp_path / "big.yaml"
    path.write_text(body + "#" * (MAX_FILE_BYTES - len(body.encode()) - 1) + "\n", "utf-8")
    assert path.stat().st_size == MAX_FILE_BYTES
    assert isinstance(load_manifest(str(path), corpus_config), LoadedManifest)


def test_config_over_one_mib_is_refused(tmp_path: Path) -> None:
    body = (CORPUS / "config.yaml").read_text(encoding="utf-8")
    path = tmp_path / "config.yaml"
    path.write_text(body + ("# padding\n" * (MAX_FILE_BYTES // 10 + 1)), encoding="utf-8")
    size = path.stat().st_size
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {size} bytes, more than the")):
        load_config(str(path))


@pytest.mark.parametrize(
    ("opener", "closer", "step"),
    [("[", "]", "[0]"), ("{a: ", "}", ".a")],
    ids=["flow-sequences", "flow-mappings"],
)
def test_hostile_nesting_is_refused_at_the_limit(
    tmp_path: Path, corpus_config: Config, opener: str, closer: str, step: str
) -> None:
    """10,000 levels: refused with its line, column and field, not a RecursionError.

    Which layer stops it depends on the PyYAML release: the loader's own limit at level 33
    (the full path is known), or, from PyYAML 6.0.3 on, libyaml's at level 1000, which its
    scanner reaches while reading a flow sequence ahead, before the loader has seen more
    than the key `extra` (so that is the path named). Both hold the file, the line, a
    column, a field and a message naming the limit that was hit.
    """
    depth = 10_000
    text = _valid_manifest() + "extra:\n  " + opener * depth + "x" + closer * depth + "\n"
    path = tmp_path / "deep.yaml"
    path.write_text(text, encoding="utf-8")
    assert path.stat().st_size < MAX_FILE_BYTES
    line = text.count("\n", 0, text.index("extra:")) + 2
    result = load_manifest(str(path), corpus_config)
    assert isinstance(result, FailedManifest)
    (err,) = result.errors
    assert err.location.file == str(path)
    assert err.location.line == line
    assert err.location.column is not None and err.location.column > 1
    if "libyaml" in err.message:
        # The layer below stopped it: it says so, and the path is the keys seen so far.
        assert err.field == "extra"
        assert err.message.startswith("nesting deeper than libyaml's own limit (flow ")
        assert f"at most {MAX_DEPTH} levels" in err.message
        assert err.location.column > MAX_DEPTH + 2
    else:
        # The top-level mapping is level 1 and `extra`'s value level 2: level 33 is 31
        # steps in.
        assert err.field == "extra" + step * (MAX_DEPTH - 1)
        assert err.message == f"nesting deeper than {MAX_DEPTH} levels"
        assert err.location.column == 3 + len(opener) * (MAX_DEPTH - 1)


def test_libyaml_depth_limit_names_the_keys_seen(tmp_path: Path) -> None:
    """The error libyaml raises from its scanner names the field the loader was reading.

    Built for the releases whose libyaml has a limit (6.0.3 on); with an older one the
    loader's own limit stops it, and the field path is then complete."""
    text = "a:\n  b:\n    - 1\n    - [" + "[" * 1200 + "]" * 1201 + "\n"
    path = tmp_path / "deep.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as e:
        load_file(str(path))
    err = e.value
    assert err.location.line == 4
    assert err.field is not None and err.field.startswith("a.b[1]")
    if "libyaml" in err.message:
        assert err.field == "a.b[1]"
    else:
        assert err.field == "a.b[1]" + "[0]" * (MAX_DEPTH - 3)


def test_nesting_of_exactly_the_limit_is_parsed(tmp_path: Path, corpus_config: Config) -> None:
    levels = MAX_DEPTH - 1  # plus the top-level mapping
    text = _valid_manifest() + "extra: " + "[" * levels + "]" * levels + "\n"
    path = tmp_path / "deep.yaml"
    path.write_text(text, encoding="utf-8")
    line = text.count("\n", 0, text.index("extra:")) + 1
    result = load_manifest(str(path), corpus_config)
    _assert_fails_with(result, str(path), line, "extra", "unknown field")


# ---------------------------------------------------------------- directories and examples


def _one_bad_params() -> list[Any]:
    picks = [
        "-lvm-holds-qcow2.yaml",  # refused by the schema
        "-pool-unknown.yaml",  # refused by the config's references
        "-duplicate-key-top.yaml",  # refused by the YAML loader
        "-non-utf8-value.yaml",  # refused when decoding
        "-size-5000-digits.yaml",  # crashes the YAML layer today
    ]
    params = []
    for suffix in picks:
        (key,) = [k for k in EXPECTATIONS if k.startswith("manifests/") and k.endswith(suffix)]
        reason = EXPECTATIONS[key].xfail
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(key, id=Path(key).name, marks=marks))
    return params


@pytest.mark.parametrize("bad", _one_bad_params())
def test_one_bad_manifest_among_good_ones(tmp_path: Path, corpus_config: Config, bad: str) -> None:
    exp = EXPECTATIONS[bad]
    good = sorted((CORPUS / "valid").iterdir())
    for p in good:
        shutil.copy(p, tmp_path / p.name)
    bad_path = tmp_path / Path(bad).name
    shutil.copy(CORPUS / bad, bad_path)

    loaded, failed = load_manifests([str(tmp_path)], corpus_config)

    assert sorted(Path(lm.file).name for lm in loaded) == [p.name for p in good]
    assert [f.file for f in failed] == [str(bad_path)]
    _assert_fails_with(failed[0], str(bad_path), exp.line, exp.field, exp.message)


def test_examples_load_cleanly(tmp_path: Path) -> None:
    examples = ROOT / "examples"
    template = (examples / "config.yaml.in").read_text(encoding="utf-8")
    text = template.replace("@LIBVIRT_URI@", "qemu:///system").replace(
        "@RUN_DIR@", str(tmp_path / "run")
    )
    assert "@" not in re.sub(r"#.*", "", text), "a placeholder was left unsubstituted"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(text, encoding="utf-8")
    config = load_config(str(config_path))

    loaded, failed = load_manifests([str(examples / "manifests")], config)

    assert [str(e) for f in failed for e in f.errors] == []
    names = sorted(p.name for p in (examples / "manifests").iterdir() if p.suffix == ".yaml")
    assert sorted(Path(lm.file).name for lm in loaded) == names
    assert len(names) >= 4


def test_config_byte_counts_take_the_manifests_units_and_the_schema_agrees(
    tmp_path: Path,
) -> None:
    """Every byte count of the config (lvm volumeClearSize, an image's size) takes '2GiB'
    as a manifest's size does, is held as bytes, and the config's JSON Schema accepts and
    refuses what the loader does."""
    from jsonschema import Draft202012Validator

    text = (CORPUS / "configs" / "055-lvm-without-vg.yaml").read_text(encoding="utf-8")
    text = text.replace("lvm: {activate: false}", "lvm: {vg: vg0, volumeClearSize: 2GiB}")
    text = text.replace("size: 629145600", "size: 600MiB")
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = load_config(str(path))
    lvm = cfg.pools["vg"].lvm
    assert lvm is not None and lvm.volume_clear_size == 2 << 30
    assert cfg.images["ubuntu"].size == 600 << 20
    dumped = cfg.model_dump(by_alias=True, mode="json")
    assert dumped["pools"]["vg"]["lvm"]["volumeClearSize"] == 2 << 30  # written as bytes

    schema = Config.model_json_schema(by_alias=True)
    Draft202012Validator.check_schema(schema)
    v = Draft202012Validator(schema)
    doc = yaml.safe_load(text)
    assert list(v.iter_errors(doc)) == []
    for where, value, loads in [
        (("pools", "vg", "lvm", "volumeClearSize"), 0, True),
        (("pools", "vg", "lvm", "volumeClearSize"), 1000, True),  # no sector rule
        (("pools", "vg", "lvm", "volumeClearSize"), "512 B", True),
        (("pools", "vg", "lvm", "volumeClearSize"), "2GB", False),
        (("pools", "vg", "lvm", "volumeClearSize"), -1, False),
        (("images", "ubuntu", "size"), "1KiB", True),
        (("images", "ubuntu", "size"), 0, False),
        (("images", "ubuntu", "size"), "0MiB", False),
        (("images", "ubuntu", "size"), "1.5GiB", False),
    ]:
        changed = yaml.safe_load(text)
        at = changed
        for key in where[:-1]:
            at = at[key]
        at[where[-1]] = value
        path.write_text(yaml.safe_dump(changed), encoding="utf-8")
        try:
            load_config(str(path))
            loaded = True
        except ConfigError:
            loaded = False
        assert loaded is loads, (where, value)
        assert (not list(v.iter_errors(changed))) is loads, (where, value)
