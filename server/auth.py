"""API-key check for every call (metadata `x-api-key`). Health checks stay open so load
balancers and orchestrators can probe the server without a key."""

from __future__ import annotations

import hmac

import grpc

API_KEY_HEADER = "x-api-key"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: frozenset[str]):
        if not keys:
            raise ValueError("ApiKeyInterceptor needs at least one key")
        self._keys = tuple(k.encode() for k in keys)

    def _allowed(self, key: str | None) -> bool:
        if key is None:
            return False
        given = key.encode()
        # compare against every key so the time taken says nothing about which one matched
        return sum(hmac.compare_digest(given, k) for k in self._keys) > 0

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        key = metadata.get(API_KEY_HEADER)
        if self._allowed(key if isinstance(key, str) else None):
            return await continuation(handler_call_details)
        message = (
            f"missing API key: send metadata '{API_KEY_HEADER}: <key>'"
            if key is None
            else f"API key in '{API_KEY_HEADER}' is not valid; check the key the server was started with"
        )
        handler = await continuation(handler_call_details)
        return _deny(handler, message)


def _deny(handler, message: str):
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def abort_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    if handler is None:
        return None
    kwargs = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort_unary, **kwargs)
