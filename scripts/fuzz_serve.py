#!/usr/bin/env python3
"""Fuzz the upload route of `deepfeat serve` on loopback; check every answer and the server's memory.

    python scripts/fuzz_serve.py /tmp/ukb-store --root /work/shared/data/ukbench56
    python scripts/fuzz_serve.py STORE --cases 3000 --duration 300 --slow-clients 8 --out bench-out/fuzz.json

A real server process (``python -m deepfeat.serve`` on 127.0.0.1, ``--body-timeout``
short) receives, in a seeded random order and bounded by ``--cases`` and ``--duration``:

* the fixed hostile corpus of :func:`hostile_uploads` (random bytes, truncated JPEG/PNG,
  polyglots, HTML/SVG/PDF/ZIP named as images, a decompression-bomb header, wrong
  content types, broken multipart bodies, oversized part headers, a wrong field name);
* mutations of real images: bit flips, byte runs overwritten, truncation at a random
  point, random bytes appended (some still decode: those may answer 200);
* slow clients: ``--slow-clients`` connections that send an upload body a byte at a time
  and then stall (each must get 408 after the body timeout, and hold nothing after), and
  as many that send half a request line and stall (uvicorn has no header timeout: they
  hold a connection each, not a request slot; the script closes them after the run).

Every answer must be JSON (``{"error", "detail"}`` for 4xx/5xx, results for 200); a good
upload between batches must still answer 200. The server's VmRSS is read after warm-up
and at the end (and its peak, VmHWM). Prints a table of cases by outcome and writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# the corpus (also used by tests/test_serve_guards.py)
# ---------------------------------------------------------------------------

def png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header declaring *width* x *height* pixels, with no pixel data behind it."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def hostile_uploads(rng: np.random.Generator, jpeg: bytes, png: bytes) -> list[tuple[str, dict]]:
    """(label, httpx request keyword arguments) of uploads that must each get a JSON 4xx."""
    cases: list[tuple[str, dict]] = []

    def file(label, data, ctype="image/jpeg", name="q.jpg"):
        cases.append((label, {"files": {"file": (name, data, ctype)}}))

    def raw(label, body: bytes, ctype: str):
        cases.append((label, {"content": body, "headers": {"content-type": ctype}}))

    for i in range(4):
        file(f"random bytes {i}", rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes())
    for frac in (0.01, 0.1, 0.5):
        file(f"jpeg truncated to {frac:.0%}", jpeg[: int(len(jpeg) * frac)])
    file("png truncated", png[: len(png) // 3], "image/png", "q.png")
    file("jpeg header then random", jpeg[:600] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    file("html named .jpg", b"<!doctype html><script>alert(1)</script>")
    file("svg", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>', "image/svg+xml", "q.svg")
    file("zip named .png", b"PK\x03\x04" + bytes(200), "image/png", "q.png")
    file("gif-javascript polyglot", b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00*/=alert(1);", "image/gif", "q.gif")
    file("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "application/pdf", "q.pdf")
    file("empty", b"")
    file("png bomb header", png_bomb(), "image/png", "q.png")
    raw("json body", b'{"file": "x"}', "application/json")
    raw("raw jpeg body", jpeg, "image/jpeg")
    raw("multipart without boundary", b"--x\r\n", "multipart/form-data")
    raw("unclosed multipart", b'--b\r\ncontent-disposition: form-data; name="file"\r\n\r\n' + jpeg[:100],
        "multipart/form-data; boundary=b")
    cases.append(("wrong field name", {"files": {"image": ("q.jpg", jpeg, "image/jpeg")}}))
    raw("40 KB part header", b"--b\r\nx-junk: " + b"a" * 40_000 + b'\r\ncontent-disposition: form-data; name="file";'
        b' filename="q.jpg"\r\n\r\nnot a jpeg\r\n--b--\r\n', "multipart/form-data; boundary=b")
    raw("200 KB part header", b"--b\r\nx-junk: " + b"a" * 200_000 + b"\r\n\r\nx\r\n--b--\r\n",
        "multipart/form-data; boundary=b")
    raw("garbage multipart", rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(), "multipart/form-data; boundary=b")
    return cases


def mutated_upload(rng: np.random.Generator, data: bytes) -> tuple[str, dict]:
    """A real image damaged at random (it may still decode)."""
    b = bytearray(data)
    how = int(rng.integers(0, 4))
    if how == 0:
        for pos in rng.integers(0, len(b), int(rng.integers(1, 20))):
            b[pos] ^= 1 << int(rng.integers(0, 8))
        label = "bit flips"
    elif how == 1:
        pos, n = int(rng.integers(0, len(b))), int(rng.integers(1, 2000))
        b[pos: pos + n] = rng.integers(0, 256, len(b[pos: pos + n]), dtype=np.uint8).tobytes()
        label = "bytes overwritten"
    elif how == 2:
        b = b[: int(rng.integers(0, len(b)))]
        label = "truncated at random"
    else:
        b += rng.integers(0, 256, int(rng.integers(1, 10000)), dtype=np.uint8).tobytes()
        label = "random bytes appended"
    return f"mutated: {label}", {"files": {"file": ("m.jpg", bytes(b), "image/jpeg")}}


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, float]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def slow_body_client(port: int, total_s: float, result: list) -> None:
    """Send an upload's headers and a few body bytes slowly, then stall; record the answer."""
    body_len = 100_000
    head = (f"POST /api/search/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b"
            f"\r\nContent-Length: {body_len}\r\n\r\n").encode()
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=total_s + 30) as s:
            s.sendall(head)
            for ch in b"--b\r\n":  # a trickle, then nothing
                s.sendall(bytes([ch]))
                time.sleep(0.2)
            data = b""
            answered = None
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answered = answered or time.perf_counter() - t0
                data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
        body = data.partition(b"\r\n\r\n")[2]
        is_json = body.startswith(b"{") and "error" in json.loads(body)
        result.append({"status": status, "json": is_json, "answered_after_s": round(answered or 0.0, 2),
                       "closed_after_s": round(time.perf_counter() - t0, 2)})
    except (OSError, ValueError) as e:
        result.append({"status": None, "error": f"{type(e).__name__}: {e}",
                       "seconds": round(time.perf_counter() - t0, 2)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--root", help="base of the store's relative image paths")
    ap.add_argument("--cases", type=int, default=2000, help="uploads at most (default 2000)")
    ap.add_argument("--duration", type=float, default=240.0, help="seconds at most (default 240)")
    ap.add_argument("--slow-clients", type=int, default=4, help="slow-body and slow-header clients each (default 4)")
    ap.add_argument("--body-timeout", type=float, default=3.0, help="the server's --body-timeout (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/fuzz_serve.json")
    args = ap.parse_args(argv)
    if args.cases < 1 or args.duration <= 0 or not 0 <= args.slow_clients <= 32:
        ap.error("--cases and --duration must be positive, --slow-clients 0..32")

    import httpx

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_serve import Server

    from deepfeat.store import FeatureStore

    store = FeatureStore(args.store)
    root = args.root or os.getcwd()
    paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in store.paths[:16]]
    images = [Path(p).read_bytes() for p in paths]
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(images[0])).save(buf, "PNG")
    png = buf.getvalue()
    rng = np.random.default_rng(args.seed)
    corpus = hostile_uploads(rng, images[0], png)

    srv = Server(args.store, args.root, ["--body-timeout", str(args.body_timeout), "--max-upload-mb", "4"])
    assert srv.url.startswith("http://127.0.0.1:")
    outcomes: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    slow_body: list[dict] = []
    good_checks = 0
    t_start = time.perf_counter()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            srv.wait_ready(c)
            good = {"files": {"file": ("good.jpg", images[0], "image/jpeg")}}
            for _ in range(4):
                c.post("/api/search/upload", **good).raise_for_status()
            mem0 = proc_status(srv.proc.pid)
            port = int(srv.url.rsplit(":", 1)[1])
            slow = [threading.Thread(target=slow_body_client, args=(port, args.body_timeout, slow_body))
                    for _ in range(args.slow_clients)]
            header_socks = []
            for _ in range(args.slow_clients):  # half a request line, then silence
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"POST /api/search/upl")
                header_socks.append(s)
            for t in slow:
                t.start()
            n = 0
            deadline = t_start + args.duration
            while n < args.cases and time.perf_counter() < deadline:
                if n % len(corpus) < len(corpus) // 2:
                    label, kw = corpus[int(rng.integers(0, len(corpus)))]
                else:
                    label, kw = mutated_upload(rng, images[int(rng.integers(0, len(images)))])
                try:
                    r = c.post("/api/search/upload", **kw)
                    status = r.status_code
                    ok_json = r.headers.get("content-type", "").startswith("application/json")
                    body = r.json() if ok_json else None
                    if status >= 400:
                        ok_json = ok_json and isinstance(body, dict) and set(body) == {"error", "detail"}
                    good_answer = ok_json and (status < 500 or status == 503) and (
                        status >= 400 or label.startswith("mutated"))
                except (httpx.HTTPError, ValueError) as e:
                    status, good_answer = type(e).__name__, False
                kind = label.split(" ")[0] if label.startswith(("random bytes", "jpeg truncated")) else label
                kind = "random bytes" if kind == "random" else "jpeg truncated" if kind == "jpeg" else kind
                outcomes.setdefault(kind, {})
                outcomes[kind][str(status)] = outcomes[kind].get(str(status), 0) + 1
                if not good_answer:
                    failures.append(f"{label}: {status}")
                n += 1
                if n % 100 == 0:  # the server still answers a good upload
                    r = c.post("/api/search/upload", **good)
                    good_checks += 1
                    if r.status_code != 200:
                        failures.append(f"good upload after {n} cases: {r.status_code}")
            for t in slow:
                t.join(args.body_timeout + 60)
            r = c.post("/api/search/upload", **good)
            alive = r.status_code == 200 and c.get("/api/health").json()["status"] == "ok"
            mem1 = proc_status(srv.proc.pid)
            for s in header_socks:
                s.close()
    finally:
        srv.stop()
    seconds = time.perf_counter() - t_start
    slow_ok = all(x.get("status") == 408 and x.get("json") for x in slow_body)
    print(f"{n} uploads in {seconds:.0f} s against {args.store}; good upload checked {good_checks + 1} times")
    print(f"{'case':34s} outcomes (status: count)")
    for kind in sorted(outcomes):
        print(f"{kind:34s} " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes[kind].items())))
    print(f"slow body clients (status, answered after s, closed after s): "
          f"{[(x.get('status'), x.get('answered_after_s'), x.get('closed_after_s')) for x in slow_body]} "
          f"(want 408 after ~1 s of trickle + {args.body_timeout:g} s)")
    print(f"slow header clients: {len(header_socks)} held a connection until closed; the server kept answering")
    print(f"server memory: VmRSS {mem0.get('VmRSS')} MiB after warm-up -> {mem1.get('VmRSS')} MiB at the end "
          f"(peak VmHWM {mem1.get('VmHWM')} MiB); alive at the end: {alive}")
    print(f"failures: {len(failures)}" + (f" e.g. {failures[:5]}" if failures else ""))
    out = {"benchmark": "fuzz_serve",
           "command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)),
           "cases": n, "seconds": round(seconds, 1), "outcomes": outcomes, "failures": failures[:50],
           "slow_body_clients": slow_body, "slow_header_clients": len(header_socks), "alive": alive,
           "memory_mib": {"after_warmup": mem0, "end": mem1}, "server_cmd": srv.cmd}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if alive and not failures and slow_ok else 1


if __name__ == "__main__":
    sys.exit(main())
