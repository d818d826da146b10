# Sourced by scripts/setup.sh, lock.sh and test-latest.sh: the pinned uv, and helpers.
#
# uv installs the locked packages (exactly, in a few seconds) and resolves new locks. It is
# itself installed from requirements-uv.lock (hash-checked, by pip) into .tools/uv, apart
# from .venv, so syncing .venv never removes it. It never downloads a Python: the machine's
# python3 is used.
export UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1
UV=.tools/uv/bin/uv

ensure_uv() {
    local want have
    want=$(sha256sum requirements-uv.lock | cut -d' ' -f1)
    have=$(cat .tools/uv/.stamp 2>/dev/null || true)
    if [ -x "$UV" ] && [ "$have" = "$want" ] && "$UV" --version >/dev/null 2>&1; then
        return 0
    fi
    echo "setup: installing uv (requirements-uv.lock)..."
    rm -rf .tools/uv
    python3 -m venv .tools/uv
    # PIP_CONFIG_FILE=/dev/null: the machine's own pip settings (extra indexes) play no part.
    PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        .tools/uv/bin/python -m pip install -q \
        --require-hashes --no-deps -r requirements-uv.lock
    echo "$want" >.tools/uv/.stamp
}

# A hash of the dependency lists in pyproject.toml (not of the whole file: a lint setting
# needs no new lock).
deps_hash() {
    python3 - <<'PY'
import hashlib, json, tomllib
with open("pyproject.toml", "rb") as f:
    p = tomllib.load(f)["project"]
deps = {"dependencies": p.get("dependencies", []), "optional": p.get("optional-dependencies", {}),
        "python": p.get("requires-python", "")}
print(hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest())
PY
}

# Debian's rados/rbd extension modules, made importable in the venv $1 (there is no usable
# PyPI build): symlinks in $1/debian-ceph, put on the path by a .pth file.
link_debian_ceph() {
    local venv=$1 site suffix so mod
    read -r site suffix < <("$venv/bin/python" -c \
        'import sysconfig; print(sysconfig.get_paths()["purelib"], sysconfig.get_config_var("EXT_SUFFIX"))')
    mkdir -p "$venv/debian-ceph"
    for mod in rados rbd; do
        so=/usr/lib/python3/dist-packages/$mod$suffix
        [ -e "$so" ] || { echo "setup: error: $so not found: Debian's python3-$mod does not match the venv's python" >&2; return 1; }
        ln -sfn "$so" "$venv/debian-ceph/$mod$suffix"
    done
    echo "$(cd "$venv" && pwd)/debian-ceph" >"$site/debian-ceph.pth"
}
