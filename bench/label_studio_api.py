"""A stand-in Label Studio API on loopback, for the benchmarks and the integration tests.

``LabelStudioAPI`` answers the three Label Studio API calls the training job makes
(``/api/projects/<id>/``, paged ``/api/tasks/``, ``/data/upload/...``) in LS 1.23's JSON shapes,
with synthetic scenes annotated as brush RLE (the sdk's encoder) and a legacy token.
(tests/e2e/test_training_e2e.py runs against a real Label Studio.)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

from bench.loopback import LoopbackServer, QuietHandler, png_bytes
from bench.ls_shapes import brush_region

LEGACY_TOKEN = "integration0legacy0token0000000000000000"
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
</View>"""


class LabelStudioAPI(LoopbackServer):
    """A stand-in Label Studio API for project ``project_id`` with ``n_tasks`` annotated scenes."""

    def __init__(
        self, project_id: int = 7, n_tasks: int = 6, size: int = 96, seed: int = 100
    ) -> None:
        from training.scenes import make_scene

        self.project_id = project_id
        self.files: dict[str, bytes] = {}
        self.tasks: list[dict[str, Any]] = []
        self.requests = 0
        for i in range(n_tasks):
            scene = make_scene(seed + i, size=size)
            path = f"/data/upload/{project_id}/scene{i}.png"
            self.files[path] = png_bytes(scene.image)
            regions = [brush_region(m, f"r{k}") for k, m in enumerate(scene.masks) if m.any()]
            self.tasks.append(
                {
                    "id": 1000 + i,
                    "data": {"image": path},
                    "annotations": [
                        {
                            "id": 5000 + i,
                            "result": regions,
                            "was_cancelled": False,
                            "updated_at": "2026-11-25T20:00:00Z",
                        }
                    ],
                }
            )
        api = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                api.requests += 1
                if self.headers.get("Authorization") != f"Token {LEGACY_TOKEN}":
                    self.send_json(401, {"detail": "Authentication credentials were not provided."})
                    return
                url = urlparse(self.path)
                query = parse_qs(url.query)
                if url.path == f"/api/projects/{api.project_id}/":
                    self.send_json(200, {"id": api.project_id, "label_config": LABEL_CONFIG})
                elif url.path == "/api/tasks/":
                    page, size = int(query["page"][0]), int(query["page_size"][0])
                    chunk = api.tasks[(page - 1) * size : page * size]
                    if not chunk and page > 1:
                        self.send_json(404, {"detail": "Invalid page."})
                    else:
                        self.send_json(200, {"tasks": chunk, "total": len(api.tasks)})
                elif url.path in api.files:
                    self.send_body(200, api.files[url.path], "image/png")
                else:
                    self.send_json(404, {"detail": "Not found."})

        super().__init__(Handler)
