"""The generated gRPC stubs in vrex/api match proto/vrex/v1/vrex.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from vrex.api import generate


def test_stubs_are_current():
    pytest.importorskip("grpc_tools")
    assert generate.stale_files() == [], "run `python -m vrex.api.generate` and commit the result"


def test_stale_stub_is_detected(tmp_path: Path):
    pytest.importorskip("grpc_tools")
    generate.generate(tmp_path)
    assert generate.stale_files(tmp_path) == []
    stub = tmp_path / "vrex_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    assert generate.stale_files(tmp_path) == ["vrex_pb2.py"]


def test_descriptor_names_the_versioned_package():
    from vrex.api import vrex_pb2

    assert vrex_pb2.DESCRIPTOR.package == "vrex.v1"
    assert vrex_pb2.DESCRIPTOR.name == "vrex/v1/vrex.proto"
    methods = {m.name for m in vrex_pb2.DESCRIPTOR.services_by_name["VRex"].methods}
    assert methods == {"Stream", "GetServerInfo", "GetSessionStats", "ResumeSession"}
