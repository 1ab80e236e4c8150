"""A real loopback HTTP server standing in for Label Studio's file and token endpoints.

Used by the backend and Label Studio adapter tests. Routes:

- ``GET /public/<name>``           a file, no auth
- ``GET /data/upload/<pid>/<name>`` a file, needs ``Authorization: Token <legacy>`` or
                                    ``Bearer <access>`` (an access token it issued)
- ``POST /api/token/refresh/``     ``{"refresh": <PAT>}`` -> ``{"access": <JWT>}``
- ``GET /slow/<name>``             answers after ``slow_s`` seconds
- ``GET /trickle-body/<name>``     headers at once, then the body a byte per ``trickle_s``
- ``GET /trickle-headers/<name>``  the status line, then a header a byte per ``trickle_s``
                                    (both hang up after ``trickle_bytes`` bytes)
- ``GET /api/...``                 404, or trickled headers with ``trickle_api``
- anything else                    404
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections import Counter

import httpx
import numpy as np

from bench.loopback import LoopbackServer, QuietHandler, png_bytes

__all__ = [
    "CONFIG",
    "NO_ACCESS_TOKEN_ANSWERS",
    "FakeLabelStudio",
    "H",
    "W",
    "box",
    "fake_jwt",
    "kp",
    "png_bytes",
    "scene",
]

# 200 answers of a token exchange that hold no access token, by name (the parser:
# labelstudio.auth.access_token_of). A new Response each call.
NO_ACCESS_TOKEN_ANSWERS = {
    "html": lambda: httpx.Response(200, text="<html>a login page</html>"),
    "not-utf8": lambda: httpx.Response(200, content=b"\xff\xfe{"),
    "no-access": lambda: httpx.Response(200, json={"detail": "no access here"}),
    "not-an-object": lambda: httpx.Response(200, json=["access"]),
    "access-null": lambda: httpx.Response(200, json={"access": None}),
}

# The labeling config of the app tests, and the size of their scene image (scene(H, W)).
CONFIG = """<View>
  <Image name="picture" value="$img"/>
  <BrushLabels name="masks" toName="picture"><Label value="Car"/><Label value="Tree"/></BrushLabels>
  <KeyPointLabels name="clicks" toName="picture" smart="true">
    <Label value="Car"/><Label value="Tree"/></KeyPointLabels>
  <RectangleLabels name="boxes" toName="picture" smart="true">
    <Label value="Car"/><Label value="Tree"/></RectangleLabels>
</View>"""
H, W = 96, 128


def kp(x, y, label="Car", positive=None):
    """A CONFIG keypoint region at (x, y) percent, as LS sends it in params.context.result."""
    region = {"type": "keypointlabels", "from_name": "clicks", "to_name": "picture",
              "original_width": W, "original_height": H,
              "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]}}  # fmt: skip
    if positive is not None:
        region["is_positive"] = positive
    return region


def box(x, y, w, h, label="Car"):
    """A CONFIG rectangle region, top-left (x, y) and size in percent."""
    return {"type": "rectanglelabels", "from_name": "boxes", "to_name": "picture",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label]}}  # fmt: skip


def fake_jwt(payload: dict) -> str:
    """A JWT-shaped token (unsigned: only its shape and ``exp`` matter to the backend)."""

    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


def scene(height: int = 120, width: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """A bright rectangle on a dark background: (image (H, W, 3) uint8, object mask (H, W))."""
    image = np.full((height, width, 3), 30, np.uint8)
    mask = np.zeros((height, width), bool)
    mask[height // 4 : height * 3 // 4, width // 4 : width * 3 // 4] = True
    image[mask] = (220, 200, 60)
    return image, mask


class FakeLabelStudio(LoopbackServer):
    """The server; ``files`` maps a name to bytes; ``requests`` counts requests per path.

    ``FakeLabelStudio.serving_a_scene()``: one whose ``scene.png`` is ``scene(60, 80)``.
    """

    @classmethod
    def serving_a_scene(cls) -> FakeLabelStudio:
        server = cls()
        server.files["scene.png"] = png_bytes(scene(60, 80)[0])
        return server

    def __init__(self, legacy_token: str = "legacy0123456789", pat: str | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.legacy_token = legacy_token
        self.pat = pat or fake_jwt({"token_type": "refresh", "exp": time.time() + 3600})
        self.access_tokens: set[str] = set()
        self.refreshes = 0
        self.slow_s = 3.0
        self.trickle_s = 0.5
        self.trickle_bytes = 8
        self.trickle_refresh = False  # answer POST /api/token/refresh/ with trickled headers
        self.trickle_api = False  # answer GET /api/... with trickled headers
        self.requests: Counter[str] = Counter()
        self.auth_headers: list[str] = []
        server = self

        class Handler(QuietHandler):
            def trickle(self, data: bytes) -> None:
                """Write ``data`` a byte per ``trickle_s``; hang up after ``trickle_bytes``."""
                self.close_connection = True
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for byte in data[: server.trickle_bytes]:
                        self.wfile.write(bytes([byte]))
                        time.sleep(server.trickle_s)

            def trickle_headers(self) -> None:
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                self.trickle(b"X-Padding: " + b"." * 1000)

            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                server.requests[self.path] += 1
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if server.trickle_refresh:
                    self.trickle_headers()
                elif self.path == "/api/token/refresh/" and body.get("refresh") == server.pat:
                    server.refreshes += 1
                    access = fake_jwt({"exp": time.time() + 300, "n": server.refreshes})
                    server.access_tokens.add(access)
                    self.send_body(200, json.dumps({"access": access}).encode())
                else:
                    self.send_body(401, b'{"detail": "bad token"}')

            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                path = self.path.split("?")[0]
                server.requests[path] += 1
                auth = self.headers.get("Authorization", "")
                server.auth_headers.append(auth)
                name = path.rsplit("/", 1)[-1]
                if path.startswith("/slow/"):
                    time.sleep(server.slow_s)
                if path.startswith("/data/upload/"):
                    scheme, _, token = auth.partition(" ")
                    ok = (scheme == "Token" and token == server.legacy_token) or (
                        scheme == "Bearer" and token in server.access_tokens
                    )
                    if not ok:
                        self.send_body(
                            401, b'{"detail": "Authentication credentials were not provided."}'
                        )
                        return
                if path.startswith("/trickle-headers/") or (
                    server.trickle_api and path.startswith("/api/")
                ):
                    self.trickle_headers()
                elif path.startswith("/trickle-body/") and name in server.files:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.files[name])))
                    self.end_headers()
                    self.trickle(server.files[name])
                elif name in server.files and not path.startswith("/nowhere/"):
                    self.send_body(200, server.files[name], "image/png")
                else:
                    self.send_body(404, b'{"detail": "Not found."}')

        super().__init__(Handler)
