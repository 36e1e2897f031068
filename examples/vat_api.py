#!/usr/bin/env python3
"""A small "side project" API that knows nothing about Tollgate.

It validates EU VAT numbers (format and check digits for a few countries,
offline) and has a toy text-summary endpoint that, like an LLM API, reports
the tokens it used in an `X-Usage-Tokens` response header, and a toy
OpenAI-compatible `POST /v1/chat/completions` that reports its tokens in
`usage` as OpenAI does: in the JSON body, or, with `"stream": true`, in the
last event of a `text/event-stream` (as with `stream_options.include_usage`).

Run: python3 examples/vat_api.py [--port 8000]
"""
import argparse
import json
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Country code -> regex for the national part (from the EU VIES formats).
FORMATS = {
    "AT": r"U\d{8}", "BE": r"[01]\d{9}", "DE": r"\d{9}", "DK": r"\d{8}",
    "ES": r"[0-9A-Z]\d{7}[0-9A-Z]", "FI": r"\d{8}", "FR": r"[0-9A-Z]{2}\d{9}",
    "IE": r"\d[0-9A-Z+*]\d{5}[A-Z]{1,2}", "IT": r"\d{11}", "LU": r"\d{8}",
    "NL": r"\d{9}B\d{2}", "PL": r"\d{10}", "PT": r"\d{9}", "SE": r"\d{12}",
}


def check_digits_ok(country, number):
    """Check digits for the countries where the algorithm is public and simple."""
    if country == "DE":  # ISO 7064 MOD 11,10
        product = 10
        for d in number[:8]:
            total = (int(d) + product) % 10 or 10
            product = (2 * total) % 11
        return (11 - product) % 10 == int(number[8])
    if country == "BE":
        return 97 - int(number[:8]) % 97 == int(number[8:])
    if country == "DK":
        weights = [2, 7, 6, 5, 4, 3, 2, 1]
        return sum(int(d) * w for d, w in zip(number, weights)) % 11 == 0
    return True


def validate(vat):
    vat = re.sub(r"[\s.\-]", "", vat).upper()
    country, number = vat[:2], vat[2:]
    if country not in FORMATS:
        return {"vat": vat, "valid": False, "reason": "unsupported country"}
    if not re.fullmatch(FORMATS[country], number):
        return {"vat": vat, "valid": False, "reason": "bad format"}
    if not check_digits_ok(country, number):
        return {"vat": vat, "valid": False, "reason": "bad check digits"}
    return {"vat": vat, "valid": True, "country": country}


class Handler(BaseHTTPRequestHandler):
    server_version = "vat-api/1.0"
    protocol_version = "HTTP/1.1"

    def send_json(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def send_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def chat(self, body):
        """A toy chat completion: it answers with the first words of the
        last message, one word per stream event."""
        try:
            req = json.loads(body or b"{}")
            prompt = " ".join(str(m.get("content", "")) for m in req.get("messages", []))
        except (ValueError, AttributeError):
            return self.send_json(400, {"error": {"message": "body must be a JSON chat request"}})
        words = prompt.split()[:8] or ["Hello!"]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                 "total_tokens": len(prompt.split()) + len(words)}
        if not req.get("stream"):
            return self.send_json(200, {
                "id": "chatcmpl-toy", "object": "chat.completion", "model": "toy-1",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": " ".join(words)}}],
                "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        def event(obj):
            self.send_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")
        for w in words:
            event({"id": "chatcmpl-toy", "object": "chat.completion.chunk", "model": "toy-1",
                   "choices": [{"index": 0, "delta": {"content": w + " "}}], "usage": None})
            time.sleep(0.05)
        event({"id": "chatcmpl-toy", "object": "chat.completion.chunk", "model": "toy-1",
               "choices": [], "usage": usage})
        self.send_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/health":
            return self.send_json(200, {"status": "ok"})
        m = re.fullmatch(r"/v1/vat/([A-Za-z0-9 .\-]{4,20})", path)
        if m:
            # Tollgate tells us who is calling; we could personalise, log, etc.
            who = self.headers.get("X-Tollgate-Customer", "anonymous")
            return self.send_json(200, dict(validate(m.group(1)), customer=who))
        self.send_json(404, {"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.split("?")[0] == "/v1/ai/summarize":
            try:
                text = json.loads(body or b"{}").get("text", "")
            except ValueError:
                return self.send_json(400, {"error": "body must be JSON"})
            words = text.split()
            summary = " ".join(words[:12]) + ("…" if len(words) > 12 else "")
            tokens = len(words) + len(summary.split())
            return self.send_json(200, {"summary": summary}, {"X-Usage-Tokens": str(tokens)})
        if self.path.split("?")[0] == "/v1/chat/completions":
            return self.chat(body)
        self.send_json(404, {"error": "not found"})

    def log_message(self, fmt, *args):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
