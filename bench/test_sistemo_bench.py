"""Tests of bench/sistemo_bench.py's API client and Report, without root and without a daemon:
a fake server on a Unix socket answers with canned HTTP responses, in both error shapes the API
has had (plain {"error": "msg"} and the typed {"error": ..., "kind": ..., "status": N}).

    python3 -B -m unittest discover -s bench -p 'test_*.py'
"""

import json
import os
import socket
import tempfile
import threading
import unittest

from sistemo_bench import ApiError, Api, BenchError, Report


def chunked(lines):
    body = b"".join(b"%x\r\n%s\r\n" % (len(x), x) for x in (json.dumps(l).encode() + b"\n" for l in lines))
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
            + body + b"0\r\n\r\n")


def plain(status, obj, reason="X"):
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class FakeDaemon:
    """Answers each connection with the next canned response; records the request lines."""

    def __init__(self, responses):
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "s.sock")
        self.responses = list(responses)
        self.requests = []
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(self.path)
        self.srv.listen(8)
        self.t = threading.Thread(target=self.serve, daemon=True)
        self.t.start()

    def serve(self):
        for resp in self.responses:
            c, _ = self.srv.accept()
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += c.recv(4096)
            head, _, rest = buf.partition(b"\r\n\r\n")
            lens = [l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")]
            n = int(lens[0]) if lens else 0
            while len(rest) < n:
                rest += c.recv(4096)
            self.requests.append((head.split(b"\r\n")[0].decode(), json.loads(rest) if rest else None))
            c.sendall(resp)
            c.close()

    def close(self):
        self.srv.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


class ApiTest(unittest.TestCase):
    def api(self, *responses):
        self.fake = FakeDaemon(responses)
        self.addCleanup(self.fake.close)
        return Api(self.fake.path)

    def test_json_ok_and_route_table(self):
        api = self.api(plain(200, {"ports": []}))
        self.assertEqual(json.loads(api.expose("tgt", ["8080:80"])), {"ports": []})
        self.assertEqual(self.fake.requests, [("POST /v1/machines/tgt/expose HTTP/1.1", {"ports": ["8080:80"]})])

    def test_http_error_both_shapes(self):
        api = self.api(plain(404, {"error": "no machine x"}),
                       plain(404, {"error": "no machine x", "kind": "not_found", "status": 404}),
                       plain(400, b"Failed to deserialize the JSON body"))
        for kind in (None, "not_found"):
            with self.assertRaises(ApiError) as e:
                api.get("status", name="x")
            self.assertEqual((e.exception.message, e.exception.kind, e.exception.status),
                             ("no machine x", kind, 404))
        with self.assertRaises(ApiError) as e:
            api.unexpose("x", "1")
        self.assertEqual(e.exception.status, 400)
        self.assertIn("Failed to deserialize", e.exception.message)

    def test_event_stream(self):
        seen = []
        api = self.api(chunked([{"progress": "cloning"}, {"progress": "ready after 1s"},
                                {"result": {"name": "a", "ip": "10.200.0.2"}}]))
        r = api.events("deploy", {"image": "debian"}, progress=seen.append)
        self.assertEqual(r["ip"], "10.200.0.2")
        self.assertEqual(seen, ["cloning", "ready after 1s"])

    def test_event_stream_error_both_shapes(self):
        api = self.api(chunked([{"progress": "x"}, {"error": "disk full"}]),
                       chunked([{"error": {"error": "disk full", "kind": "disk_full", "status": 507}}]),
                       chunked([{"progress": "x"}]))
        with self.assertRaises(ApiError) as e:
            api.events("deploy", {"image": "debian"})
        self.assertEqual((e.exception.message, e.exception.kind, e.exception.status), ("disk full", None, None))
        with self.assertRaises(ApiError) as e:
            api.delete("a")
        self.assertEqual((e.exception.message, e.exception.kind, e.exception.status),
                         ("disk full", "disk_full", 507))
        with self.assertRaises(BenchError):  # ended without a result
            api.events("deploy", {"image": "debian"})

    def test_exec_stream(self):
        api = self.api(chunked([{"stdout": "a"}, {"stderr": "w"}, {"stdout": "b\n"}, {"exit": 3}]),
                       chunked([{"stdout": "a"}, {"error": "machine x is not running"}]),
                       chunked([{"error": {"error": "gone", "kind": "not_found", "status": 404}}]),
                       plain(404, {"error": "no machine m", "kind": "not_found", "status": 404}))
        self.assertEqual(api.exec("m", "true"), (3, "ab\n", "w"))
        self.assertEqual(self.fake.requests[0], ("POST /v1/machines/m/exec HTTP/1.1", {"cmd": "true", "timeout_s": 60}))
        with self.assertRaises(ApiError) as e:
            api.exec("m", "true")
        self.assertEqual(e.exception.message, "machine x is not running")
        with self.assertRaises(ApiError) as e:
            api.exec("m", "true")
        self.assertEqual((e.exception.kind, e.exception.status), ("not_found", 404))
        with self.assertRaises(ApiError) as e:  # an HTTP error status on a stream route
            api.exec("m", "true")
        self.assertEqual((e.exception.message, e.exception.status), ("no machine m", 404))


class ReportTest(unittest.TestCase):
    def test_refuses_broken_values(self):
        rep = Report()
        rep.add("ok_ms", 1.5, "ms", target=("<=", 2))
        for bad in (float("nan"), float("inf"), None):
            with self.assertRaises(BenchError):
                rep.add("bad", bad)
        self.assertEqual(rep.results, [("ok_ms", 1.5)])


if __name__ == "__main__":
    unittest.main()
