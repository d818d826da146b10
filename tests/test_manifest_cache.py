"""The manifest cache: what it returns is what a fresh load returns, and only that."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from reconciler.schema.manifestdir import load_manifests
from reconciler.schema.speed import mcache
from reconciler.schema.speed.mcache import ManifestCache
from tests.helpers import EXAMPLES, example_config


def copy_examples(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(EXAMPLES / "manifests", d)
    return d


@pytest.fixture(autouse=True)
def trust_new_files(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files a test just wrote have a ctime of now, which the cache rightly distrusts for
    two seconds; the tests (but the one about that rule) shorten the wait to nothing."""
    if "recently_modified" not in request.node.name:
        monkeypatch.setattr(mcache, "SAFE_AGE_NS", -(10**12))


def test_cached_load_equals_fresh_load(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    d = copy_examples(tmp_path)
    cache_path = tmp_path / "cache.json"
    fresh, failed = load_manifests([str(d)], config)
    assert not failed
    first, _ = load_manifests([str(d)], config, ManifestCache(cache_path))
    assert cache_path.exists()
    cache = ManifestCache(cache_path)
    second, _ = load_manifests([str(d)], config, cache)
    assert len(cache.fresh) == len(fresh) == 4
    for a, b in zip(fresh, second, strict=True):
        assert a.file == b.file and a.disk_lines == b.disk_lines
        assert a.manifest == b.manifest
        assert [x.spec_dict() for x in a.manifest.disks] == [
            x.spec_dict() for x in b.manifest.disks
        ]
    assert [x.manifest for x in first] == [x.manifest for x in second]


def test_a_changed_file_is_parsed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = example_config(tmp_path)
    d = copy_examples(tmp_path)
    cache_path = tmp_path / "cache.json"
    load_manifests([str(d)], config, ManifestCache(cache_path))
    web = d / "web-1.yaml"
    web.write_text(web.read_text().replace("size: 512MiB", "size: 768MiB"))
    parsed: list[str] = []
    real = mcache.construct

    def spy(data: dict[str, object], *table: object) -> object:
        parsed.append(str(data["instance"]))
        return real(data, *table)  # type: ignore[arg-type]

    monkeypatch.setattr(mcache, "construct", spy)
    loaded, _ = load_manifests([str(d)], config, ManifestCache(cache_path))
    by_file = {Path(x.file).name: x for x in loaded}
    assert by_file["web-1.yaml"].manifest.disks[1].size == 768 << 20
    assert "0b0e7f1c-58a4-4c3e-9d27-3f2a1c6e9b01" not in parsed  # web-1 came from the file
    assert len(parsed) == 3  # the three unchanged manifests came from the cache


def test_references_are_checked_even_for_cached_manifests(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    d = copy_examples(tmp_path)
    cache_path = tmp_path / "cache.json"
    load_manifests([str(d)], config, ManifestCache(cache_path))
    tpl = tmp_path / "config.tpl"
    tpl.write_text((EXAMPLES / "config.yaml.in").read_text().replace("demo-fast:", "other:"))
    changed = example_config(tmp_path, template=tpl)
    _, failed = load_manifests([str(d)], changed, ManifestCache(cache_path))
    assert sorted(Path(f.file).name for f in failed) == ["batch-7.yaml", "db-1.yaml"]
    assert any("unknown pool 'demo-fast'" in e.message for f in failed for e in f.errors)


def test_recently_modified_files_are_not_cached(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    d = copy_examples(tmp_path)
    cache = ManifestCache(tmp_path / "cache.json")
    load_manifests([str(d)], config, cache)
    assert cache.fresh == {}


def test_a_damaged_or_foreign_cache_is_ignored(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    d = copy_examples(tmp_path)
    cache_path = tmp_path / "cache.json"
    cache_path.write_text("{not json")
    loaded, failed = load_manifests([str(d)], config, ManifestCache(cache_path))
    assert len(loaded) == 4 and not failed
    doc = cache_path.read_text()
    cache_path.write_text(doc.replace(ManifestCache(cache_path).fingerprint, "0" * 64))
    assert ManifestCache(cache_path).entries == {}


def test_a_cache_over_the_json_bounds_is_ignored(tmp_path: Path) -> None:
    """The cache is JSON read within bounds (bounded.load_json): not UTF-8, or nested
    deeper than the parser goes, even with the right fingerprint, it is not used, and no
    RecursionError escapes. (Its nesting is not scanned before the parse: the file is the
    reconciler's own, private, and only read if so.)"""
    cache_path = tmp_path / "cache.json"
    fp = ManifestCache(cache_path).fingerprint
    deep = "[" * 100_000 + "]" * 100_000
    cache_path.write_text(f'{{"fingerprint": "{fp}", "entries": {{"x": {deep}}}}}')
    assert ManifestCache(cache_path).entries == {}
    shallow = "[" * 3 + "]" * 3  # the same cache, nested as the parser goes, is read
    cache_path.write_text(f'{{"fingerprint": "{fp}", "entries": {{"x": {shallow}}}}}')
    assert ManifestCache(cache_path).entries == {"x": [[[]]]}
    cache_path.write_bytes(b'{"fingerprint": "\xe9"}')
    assert ManifestCache(cache_path).entries == {}
    cache_path.write_text("[" * 100_000)
    assert ManifestCache(cache_path).entries == {}


def test_the_file_holds_each_disk_once_and_a_bad_number_is_not_used(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    d = copy_examples(tmp_path)
    for i in range(3):  # manifests that share their disks, as a host's do
        shutil.copy(d / "web-1.yaml", d / f"web-copy-{i}.yaml")
        text = (d / f"web-copy-{i}.yaml").read_text()
        (d / f"web-copy-{i}.yaml").write_text(text.replace("0b0e7f1c", f"0b0e7f1{i}"))
    cache_path = tmp_path / "cache.json"
    fresh, failed = load_manifests([str(d)], config, ManifestCache(cache_path))
    assert not failed
    doc = json.loads(cache_path.read_text())
    disks = sum(len(e[1]["disks"]) for e in doc["entries"].values())
    assert len(doc["disks"]) < disks
    assert all(type(n) is int for e in doc["entries"].values() for n in e[1]["disks"])
    # A cache written after a cached run (some entries as read, one added) is the same.
    (d / "web-copy-0.yaml").write_text((d / "web-copy-0.yaml").read_text() + "\n")
    load_manifests([str(d)], config, ManifestCache(cache_path))
    again = ManifestCache(cache_path)
    second, _ = load_manifests([str(d)], config, again)
    assert len(again.fresh) == len(fresh) and again.unsaved() is None
    assert [x.manifest for x in second] == [x.manifest for x in fresh]
    # Numbers that are no disk of the table: that manifest is parsed from its file.
    doc = json.loads(cache_path.read_text())
    web = os.path.abspath(d / "web-1.yaml")
    for bad in (len(doc["disks"]), -1, True, "0", None):
        doc["entries"][web][1]["disks"][0] = bad
        cache_path.write_text(json.dumps(doc))
        cache = ManifestCache(cache_path)
        loaded, failed = load_manifests([str(d)], config, cache)
        assert not failed and cache.dirty  # parsed (and cached again)
        assert [x.manifest for x in loaded] == [x.manifest for x in fresh]
