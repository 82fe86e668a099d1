#!/usr/bin/env python3
"""Client checks of a running `qwen-edit serve` (the demo model): the official `openai` Python client (when it is
installed), plain `requests` (multipart and JSON), server-sent progress, curl, and the bad-request suite (each a 4xx
JSON error, with a health check after each). Exit 1 on the first failure.

    python3 tests/serve/client_test.py --url http://127.0.0.1:8000
"""

import argparse
import base64
import io
import json
import pathlib
import struct
import subprocess
import sys
import zlib

import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = (ROOT / "crates/qwen-image-pipeline/assets/sample.png").read_bytes()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width, height, rows=None):
    """A PNG of `width`×`height` (rows of zeros unless given): a decompression bomb when large."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = rows if rows is not None else b"\x00" * (1 + 3 * width) * min(height, 4)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok   {what}")


def openai_client(url, model):
    try:
        import openai
    except ImportError:
        print("skip the openai client (pip install openai)")
        return
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    check(client.models.list().data[0].id == model, "openai: models.list")
    r = client.images.edit(
        model=model,
        image=("sample.png", io.BytesIO(SAMPLE), "image/png"),
        prompt="Make it purple",
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 7},
    )
    check(base64.b64decode(r.data[0].b64_json)[:4] == b"\x89PNG", f"openai {openai.__version__}: images.edit")
    try:
        client.images.edit(model=model, image=("a.png", io.BytesIO(b"nope"), "image/png"), prompt="x")
        check(False, "openai: a bad image raises")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "openai: a bad image raises BadRequestError")


def requests_client(url):
    files = {"image": ("sample.png", SAMPLE, "image/png")}
    r = requests.post(f"{url}/v1/images/edits", files=files, data={"prompt": "Add a hat", "steps": "2"}, timeout=120)
    check(r.status_code == 200 and r.json()["data"][0]["b64_json"], "requests: multipart edit")
    body = {"image": base64.b64encode(SAMPLE).decode(), "prompt": "Add a hat", "steps": 2}
    r = requests.post(f"{url}/v1/images/edits", json=body, timeout=120)
    check(r.status_code == 200 and r.json()["qwen"][0]["image_reuse"]["hits"] == 2, "requests: JSON edit reuses the image")
    r = requests.post(f"{url}/v1/images/edits", files=files, data={"prompt": "x", "stream": "true", "steps": "3"}, stream=True, timeout=120)
    events = [json.loads(l[6:]) for l in r.iter_lines(decode_unicode=True) if l and l.startswith("data: ")]
    steps = [e for e in events if "step" in e]
    check(len(steps) == 3 and events[-1]["type"] == "image_edit.completed", "requests: SSE progress then the image")
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    check("qwen_edit_reuse_hits_total" in metrics and "qwen_edit_queue_depth" in metrics, "/metrics")


def curl_client(url):
    out = subprocess.run(
        ["curl", "-sS", "-f", f"{url}/v1/images/edits", "-F", f"image=@{ROOT}/crates/qwen-image-pipeline/assets/sample.png",
         "-F", "prompt=Make it purple", "-F", "steps=2"],
        capture_output=True, check=False,
    )
    check(out.returncode == 0 and json.loads(out.stdout)["data"][0]["b64_json"], "curl: multipart edit")
    # A 100 MB body: curl waits for 100 Continue and gets the 413 before sending it.
    huge = subprocess.run(
        ["curl", "-sS", "-o", "/dev/stdout", "-w", "\n%{http_code}", f"{url}/v1/images/edits",
         "-H", "Content-Type: application/json", "--data-binary", "@-"],
        input=b" " * (100 << 20), capture_output=True, check=False,
    )
    text, _, code = huge.stdout.decode().rpartition("\n")
    check(code == "413" and json.loads(text)["error"]["code"] == "body_too_large", "curl: a 100 MB body gets 413")


def bad_requests(url):
    edits = f"{url}/v1/images/edits"
    img = ("image", ("a.png", SAMPLE, "image/png"))
    tiny = png(1, 1, b"\x00\x00\x00\x00")
    cases = [
        ("malformed multipart", dict(data=b"--zz\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=zz"})),
        ("wrong content type", dict(data=b"hello", headers={"Content-Type": "text/plain"})),
        ("bad JSON", dict(data=b'{"prompt": ', headers={"Content-Type": "application/json"})),
        ("unknown JSON field", dict(json={"image": base64.b64encode(SAMPLE).decode(), "prompt": "x", "colour": "red"})),
        ("not base64", dict(json={"image": "%%%", "prompt": "x"})),
        ("no image", dict(files=[("prompt", (None, "x"))])),
        ("not an image", dict(files=[("image", ("a.png", b"GIF89a....", "image/png")), ("prompt", (None, "x"))])),
        ("decompression bomb", dict(files=[("image", ("b.png", png(60000, 60000), "image/png")), ("prompt", (None, "x"))])),
        ("unknown field", dict(files=[img, ("prompt", (None, "x")), ("colour", (None, "red"))])),
        ("invalid schedule", dict(files=[img, ("prompt", (None, "x")), ("schedule", (None, "reuse:9"))])),
        ("unparsable schedule", dict(files=[img, ("prompt", (None, "x")), ("schedule", (None, "sometimes"))])),
        ("0 images", dict(files=[("prompt", (None, "x"))])),
        ("100 images", dict(files=[("image[]", ("t.png", tiny, "image/png"))] * 100 + [("prompt", (None, "x"))])),
        ("n = 100", dict(files=[img, ("prompt", (None, "x")), ("n", (None, "100"))])),
        ("a 10 000-character prompt", dict(files=[img, ("prompt", (None, "x" * 10000))])),
        ("steps = 0", dict(files=[img, ("prompt", (None, "x")), ("steps", (None, "0"))])),
    ]
    for name, kwargs in cases:
        r = requests.post(edits, timeout=60, **kwargs)
        ok = 400 <= r.status_code < 500 and r.json().get("error", {}).get("message")
        check(ok, f"bad request: {name} -> {r.status_code} {r.text[:100]}")
        check(requests.get(f"{url}/health", timeout=10).status_code == 200, f"  healthy after {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    args = ap.parse_args()
    model = requests.get(f"{args.url}/v1/models", timeout=10).json()["data"][0]["id"]
    openai_client(args.url, model)
    requests_client(args.url)
    curl_client(args.url)
    bad_requests(args.url)
    print("OK")


if __name__ == "__main__":
    main()
