"""Python stubs generated from proto/vrex/v1/vrex.proto (package vrex.v1).

Never edit `vrex_pb2*.py` by hand: run `python -m vrex.api.generate`.
"""
