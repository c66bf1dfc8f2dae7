"""OTLP collectors on 127.0.0.1 that misbehave on purpose, for the dead-collector tests
(tests/integration/test_dead_collector.py) and benchmarks/bench_loop_lag.py (not a test module).

Healthy, failing (HTTP 503 / gRPC UNAVAILABLE), slow, failing-then-recovering, refusing
(nothing listens) and black hole (the kernel accepts TCP, nobody reads). Each counts the spans
it received and the `voice.turn.index` of every root span.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import grpc  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

SLOW_S = 1.5  # the slow collector answers after this long (longer than the tests' timeouts)


class Collector(Protocol):
    endpoint: str

    @property
    def requests(self) -> int: ...

    @property
    def turn_indices(self) -> list[int]: ...

    @property
    def span_count(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class Behaviour:
    """What a collector does with request n (1-based)."""

    mode: str  # "ok" | "fail" | "slow"
    fail_first: int = 0
    requests: int = 0
    span_count: int = 0
    turn_indices: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_request(self) -> str:
        with self.lock:
            self.requests += 1
            if self.mode == "fail" or self.requests <= self.fail_first:
                return "fail"
            return self.mode

    def record(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.span_count += 1
                        if span.name == "voice.turn":
                            for attr in span.attributes:
                                if attr.key == "voice.turn.index":
                                    self.turn_indices.append(attr.value.int_value)


class _Counting:
    """What a collector with a Behaviour received."""

    behaviour: Behaviour

    @property
    def requests(self) -> int:
        return self.behaviour.requests

    @property
    def span_count(self) -> int:
        return self.behaviour.span_count

    @property
    def turn_indices(self) -> list[int]:
        return self.behaviour.turn_indices


class HttpCollector(_Counting):
    """OTLP/HTTP receiver: decodes ExportTraceServiceRequest; can fail with 503 or stall."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = owner.behaviour.next_request()
                with contextlib.suppress(OSError):  # the client may have given up already
                    if action == "fail":
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    if action == "slow":
                        time.sleep(SLOW_S)
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    owner.behaviour.record(request)
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class GrpcCollector(_Counting):
    """OTLP/gRPC receiver: a TraceServiceServicer; fails with UNAVAILABLE or stalls."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        owner = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self,
                request: trace_service_pb2.ExportTraceServiceRequest,
                context: grpc.ServicerContext,
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                action = owner.behaviour.next_request()
                if action == "fail":
                    context.abort(grpc.StatusCode.UNAVAILABLE, "collector overloaded")
                if action == "slow":
                    end = time.monotonic() + SLOW_S
                    while time.monotonic() < end and context.is_active():
                        time.sleep(0.02)
                owner.behaviour.record(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            Servicer(), self._server
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self._server.stop(grace=None)


class SocketCollector:
    """Refusing (a port nobody listens on) or black hole (accepts TCP, never reads/answers)."""

    def __init__(self, listen: bool) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        port = self._sock.getsockname()[1]
        if listen:
            self._sock.listen(64)  # the kernel completes handshakes; nobody ever accepts
        else:
            self._sock.close()  # nothing listens: connections are refused
        self.endpoint = f"http://127.0.0.1:{port}"
        self.requests = 0
        self.span_count = 0
        self.turn_indices: list[int] = []

    def close(self) -> None:
        self._sock.close()


def start_collector(protocol: str, fault: str) -> Collector:
    if fault in ("refused", "blackhole"):
        return SocketCollector(listen=fault == "blackhole")
    behaviour = {
        "unavailable": Behaviour("fail"),
        "slow": Behaviour("slow"),
        "recovering": Behaviour("ok", fail_first=2),
        "healthy": Behaviour("ok"),
    }[fault]
    if protocol == "grpc":
        return GrpcCollector(behaviour)
    return HttpCollector(behaviour)
