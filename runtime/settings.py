"""The one settings object of the backend, read from the environment in one place.

Every field maps to an upper-case environment variable of the same name (no prefix), e.g.
``label_studio_url`` <- ``LABEL_STUDIO_URL``. Every variable is documented in the README.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from labelstudio.download import DownloadLimits
from labelstudio.polygon import DEFAULT_MIN_PART_PX, DEFAULT_TOLERANCE_PX
from stable_sam import MODEL_TYPES
from stable_sam.build import DEFAULT_MODEL_TYPE

# The SAM bases stable_sam can build (its registry), so that a new one needs no change here.
ModelType = Literal[MODEL_TYPES]  # type: ignore[valid-type]


class Settings(BaseSettings):
    """Backend configuration. Defaults run the embedded default model with no configuration."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- Label Studio connection (images of tasks are fetched from it) ---
    # Base URL of Label Studio; relative task URLs (/data/upload/...) resolve against it.
    # Empty: the `hostname` /setup sends, if LABEL_STUDIO_TRUST_SETUP allows it.
    label_studio_url: str = ""
    # Personal access token (LS >= 1.17, a JWT refresh token) or a legacy API token.
    label_studio_api_key: SecretStr | None = None
    # Whether /setup may say where Label Studio is and which token to use (anyone who can
    # reach the backend can call /setup). False: only LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY
    # count. True: /setup's hostname is trusted if it is LABEL_STUDIO_URL's origin, or, with
    # no LABEL_STUDIO_URL, the first one seen (then pinned: another host is refused with 403);
    # its access_token is used only without LABEL_STUDIO_API_KEY and never replaces one that
    # works. See docs/SECURITY.md.
    label_studio_trust_setup: bool = False

    # --- Model selection ---
    # SAM base: the embedded default (DEFAULT_MODEL_TYPE) or another type the repository ships
    # weights for (SHIPPED_FILES), the project's minis (mini, mini_512; without shipped weights
    # they need SAM_CHECKPOINT), vit_b/vit_l/vit_h, MobileSAM vit_t, HQ-SAM hq_*, or SAM 2.1
    # sam2.1_hiera_{tiny,small,base_plus,large} (MODEL_TYPES).
    sam_model_type: ModelType = DEFAULT_MODEL_TYPE
    # Official-format SAM checkpoint (.pth; SAM 2.1: .pt) or our .safetensors; empty with a
    # shipped type = its shipped one.
    sam_checkpoint: Path | None = None
    # Stable-SAM plugins: "default" (the shipped plugins of a shipped base, none for other
    # bases until a project trains some), "none" (plain SAM, for side-by-side
    # comparison) or a path to a plugin .safetensors file.
    sam_plugins: str = "default"
    # Allow a SAM base without a checkpoint (random weights): benchmarks and tests only.
    sam_allow_random_weights: bool = False
    # torch device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # Build the model when the app starts (in the background) rather than on the first click.
    preload_model: bool = True
    # torch intra-op CPU threads; 0 = torch's default (one per core). On a small CPU shared with
    # other work, 1 avoids oversubscription: the mini decoder measured p50 45 ms with 1 thread
    # vs 301 ms with 2 on a 2-core machine at load ~8.
    torch_threads: int = Field(default=0, ge=0)

    # --- Images ---
    # Largest accepted image in pixels (W*H), checked from the header before decoding.
    image_max_pixels: int = Field(default=DownloadLimits.max_pixels, gt=0)
    # Largest accepted image download in bytes.
    image_max_bytes: int = Field(default=DownloadLimits.max_bytes, gt=0)
    # Deadline of one image download, seconds: connecting, the token exchange, headers and body
    # together (a server trickling bytes cannot hold a request longer), answered 504.
    image_fetch_timeout_s: float = Field(default=DownloadLimits.timeout_s, gt=0)
    # Decoded-image cache size, MB (RGB bytes), keyed by content hash.
    image_cache_mb: int = Field(default=512, ge=0)
    # How long a URL is trusted to keep its content (skips re-downloading while clicking), s.
    image_url_ttl_s: float = Field(default=300.0, ge=0)
    # Image-embedding cache size, MB (the predictor's cache).
    embedding_cache_mb: int = Field(default=1024, ge=0)
    # Refinement across clicks: pass the previous answer's low-res logits as the next click's
    # mask prompt. "auto": where the click-loop benchmark measured that it helps
    # (backend.click_refinement), "on": always, "off": never.
    refine_masks: Literal["auto", "on", "off"] = "auto"
    # Memory for those logits, MB (16 KB per answer on the embedded default, 256 KB on SAM);
    # an image's answers also go when its embedding leaves the embedding cache.
    click_memory_mb: int = Field(default=64, ge=0)
    # PolygonLabels projects: how far a polygon may stray from the mask's outline, pixels
    # (Douglas-Peucker; chosen by bench/bench_polygon_tolerance.py), and the smallest separate
    # part of a mask that gets a polygon of its own (the largest part always does).
    polygon_tolerance_px: float = Field(default=DEFAULT_TOLERANCE_PX, ge=0)
    polygon_min_part_px: int = Field(default=DEFAULT_MIN_PART_PX, ge=1)
    # Batch /predict (Retrieve Predictions) converting boxes: past this many seconds, the
    # backend answers only the batch's first task, so that Label Studio (whose predict timeout
    # is 100 s) asks for the rest task by task (backend.ls_backend).
    batch_predict_budget_s: float = Field(default=60.0, gt=0)
    # Threads computing embeddings in the background when a task opens (batch /predict).
    prefetch_workers: int = Field(default=1, ge=0)
    # Image decodes running at once (each holds a full-size decoded copy while it runs).
    image_decode_concurrency: int = Field(default=2, ge=1)
    # Memory the running decodes may hold together, MB, each decode's estimated from the image's
    # header (labelstudio.images.decode_peak_bytes: W*H * 4 to 15 bytes). An image over the whole
    # budget is decoded alone; IMAGE_MAX_PIXELS is what refuses images.
    image_decode_budget_mb: int = Field(default=1024, gt=0)
    # How long a request waits for a decode slot and budget before answering 503, seconds.
    image_decode_wait_s: float = Field(default=10.0, ge=0)

    # --- Security ---
    # Optional HTTP basic auth on every endpoint (Label Studio supports it for ML backends).
    basic_auth_user: str | None = None
    basic_auth_pass: SecretStr | None = None
    # Optional shared secret for /webhook, sent in the header named by webhook_secret_header
    # (an alternative to basic auth for Label Studio webhooks, which can set custom headers).
    webhook_secret: SecretStr | None = None
    webhook_secret_header: str = "X-Webhook-Secret"

    # --- Request limits ---
    # Checked before any image download or model work; a request over one is answered 413
    # request_too_large, naming the setting.
    # Largest request body of any endpoint, bytes, counted while it streams in (with or without
    # Content-Length). Webhook ANNOTATION_* and batch /predict bodies carry whole annotations
    # with brush RLEs: several MB is normal.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    # Tasks in one interactive /predict (each costs model work; Label Studio sends one).
    max_tasks_per_predict: int = Field(default=1000, gt=0)
    # Tasks in one batch /predict (LS's "Retrieve predictions" sends every selected task at
    # once; each costs an entry and validation: 2.6 M tasks in 30 MB held the process 19 s).
    max_batch_tasks: int = Field(default=10_000, gt=0)
    # Regions in one interactive /predict (entries of params.context.result); also the boxes
    # of one task a batch /predict converts (more are skipped and counted).
    max_regions: int = Field(default=500, gt=0)
    # Keypoints of one label (one object, one SAM prompt). Prompt cost grows with the points:
    # 10,000 in one prompt took 56 s and 7.4 GB; annotators place a few to a few dozen.
    max_points_per_prompt: int = Field(default=100, gt=0)
    # Keypoints of all labels of one /predict together.
    max_points_per_request: int = Field(default=500, gt=0)
    # Largest labeling config, bytes (UTF-8): /setup's schema and /predict's label_config.
    max_label_config_bytes: int = Field(default=1024 * 1024, gt=0)
    # Projects whose /setup label config is remembered (least recently used dropped; /setup
    # needs no credentials, so invented project ids must not grow memory).
    schema_cache_size: int = Field(default=256, gt=0)
    # /predict calls served at once, on worker threads of their own (more wait their turn), so
    # that slow image downloads never take the threads /setup, /webhook and /status need. A
    # download holds its thread for at most IMAGE_FETCH_TIMEOUT_S; threads are cheap, so this
    # is sized for many slow downloads beside the clicks on cached images.
    predict_concurrency: int = Field(default=64, gt=0)
    # Model calls (image embedding, mask decoding) at once, across /predict and the task-open
    # warm-up; the others wait their turn. Bounds the model's working memory (a ViT-H
    # embedding needs GBs) whatever the number of requests.
    model_concurrency: int = Field(default=2, gt=0)

    # --- Training queue and model versions ---
    redis_url: str = "redis://127.0.0.1:6379/0"
    # RQ queue the training worker listens on.
    training_queue: str = "stable-sam-training"
    # Where per-project plugin versions live: "local" (a folder, VERSIONS_DIR, on this host) or
    # "redis" (REDIS_URL, shared by every host; each host keeps its copies of the plugin files
    # under VERSIONS_DIR/from-redis). See runtime.versions.
    versions_store: Literal["local", "redis"] = "local"
    # The local store's folder; with VERSIONS_STORE=redis, where this host's copies go.
    versions_dir: Path = Path("data/versions")
    # Plugin versions kept per project.
    versions_keep: int = Field(default=5, ge=1)
    # What trains: "start_training" (LS's Start Training / train-on-submit only) or
    # "annotations" (also ANNOTATION_CREATED/UPDATED/ANNOTATIONS_DELETED events).
    train_on: Literal["start_training", "annotations"] = "start_training"
    # With TRAIN_ON=annotations: annotation events needed since the last run to start one.
    min_new_annotations: int = Field(default=1, ge=1)
    # RQ timeout of one training job, seconds.
    train_job_timeout_s: int = Field(default=3600, gt=0)
    # RQ retries of a failed/abandoned training job, and the waits before them (seconds,
    # JSON list; the worker's scheduler enqueues a retry when its wait is over).
    train_retries: int = Field(default=2, ge=0)
    train_retry_intervals_s: list[int] = Field(default_factory=lambda: [30, 120])
    # Share of a project's annotated tasks held out to decide promotion (deterministic split).
    train_val_fraction: float = Field(default=0.2, gt=0, lt=1)
    # RTS epochs over a project's training part per run (the paper's fast adaptation: 1).
    train_epochs: int = Field(default=1, ge=1)
    # torch CPU threads of a training job (0: torch's default, all cores). Default 1: on a CPU
    # shared with the backend, more threads oversubscribe the cores and run ~5-10x slower, and
    # one core stays free for interactive predictions. Irrelevant on a GPU.
    train_torch_threads: int = Field(default=1, ge=0)
    # Image-embedding cache of a training job's predictor, MB: the validation images are
    # embedded once and evaluated twice (served plugins, then the new ones).
    train_embedding_cache_mb: int = Field(default=512, ge=0)
    # Promote a new version when its validation robust mIoU (percent) is at least the served
    # one's minus this many points (0: "not worse").
    train_promote_tolerance: float = 0.0
    # Seconds between the heartbeats a worker sends for its running job (RQ's job monitoring
    # interval); the worker also checks that its scheduler process is alive then.
    train_heartbeat_s: int = Field(default=5, gt=0)
    # A started job whose heartbeat is older than this (seconds) is abandoned: /status calls it
    # "stuck", and RQ retries or fails it at the next registry cleanup. RQ's own margin is 60 s
    # past the monitoring interval.
    train_stuck_after_s: int = Field(default=30, gt=0)
    # Seconds between a worker's maintenance rounds (RQ's default: 600): clean RQ's registries
    # (abandoned jobs, of dead local workers at once), restart a dead scheduler process, reclaim
    # a scheduler lock left by a dead one. An idle worker wakes up for them.
    train_maintenance_interval_s: int = Field(default=5, gt=0)
    # At most this many training jobs wait in the queue (queued, or deferred behind a running
    # one) at once; a trigger that would add one more answers 503 queue_full (one merging into
    # a project's queued job still works). Bounds what a flood of webhooks leaves in Redis.
    max_queued_training_jobs: int = Field(default=100, ge=1)

    # --- Project-wide box conversion (POST /convert, python -m training.conversion) ---
    # RQ queue of conversion jobs (one per chunk of tasks); every worker listens on it and on
    # TRAINING_QUEUE unless started with --queue.
    convert_queue: str = "stable-sam-convert"
    # Tasks per conversion job: a worker killed mid-chunk costs at most this many tasks' work
    # (the retry skips those already written); each job builds the model once. The bound is
    # runtime.queue.conversion.MAX_CHUNK_TASKS.
    convert_chunk_tasks: int = Field(default=25, ge=1, le=1000)
    # RQ timeout of one conversion job, seconds.
    convert_job_timeout_s: int = Field(default=1800, gt=0)
    # RQ retries of a conversion job that failed (Label Studio unreachable) or was abandoned
    # (its worker killed), and the waits before them (seconds, JSON list).
    convert_retries: int = Field(default=3, ge=0)
    convert_retry_intervals_s: list[int] = Field(default_factory=lambda: [5, 30, 120])
    # Days a finished run's progress and failed tasks stay in Redis for /status.
    convert_keep_days: int = Field(default=30, ge=1)

    # --- Logging ---
    log_level: str = "INFO"

    @field_validator("label_studio_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.strip().rstrip("/")

    @field_validator(
        "sam_checkpoint",
        "label_studio_api_key",
        "basic_auth_user",
        "basic_auth_pass",
        "webhook_secret",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # docker-compose passes unset variables as "": treat them as not configured.
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    @model_validator(mode="after")
    def _heartbeats_before_stuck(self) -> Settings:
        if self.train_stuck_after_s <= self.train_heartbeat_s:
            raise ValueError(
                "TRAIN_STUCK_AFTER_S must be longer than TRAIN_HEARTBEAT_S (a live job would look "
                "abandoned between two heartbeats)"
            )
        return self

    @model_validator(mode="after")
    def _api_key_goes_to_a_named_label_studio(self) -> Settings:
        # Trust on first use would hand the operator's key to whoever calls /setup first.
        if (
            self.label_studio_trust_setup
            and self.label_studio_api_key
            and not self.label_studio_url
        ):
            raise ValueError(
                "LABEL_STUDIO_TRUST_SETUP=true with LABEL_STUDIO_API_KEY needs LABEL_STUDIO_URL: "
                "the key must go to the Label Studio you name, not to the first caller of /setup"
            )
        return self

    @property
    def basic_auth_enabled(self) -> bool:
        """True when both BASIC_AUTH_USER and BASIC_AUTH_PASS are set."""
        return bool(self.basic_auth_user) and self.basic_auth_pass is not None

    @property
    def plugins_enabled(self) -> bool:
        """False for plain SAM (SAM_PLUGINS=none)."""
        return self.sam_plugins.strip().lower() != "none"

    @property
    def label_studio_token(self) -> str:
        """LABEL_STUDIO_API_KEY's value ("" when unset), for the Label Studio adapter."""
        key = self.label_studio_api_key
        return key.get_secret_value().strip() if key is not None else ""

    @property
    def download_limits(self) -> DownloadLimits:
        """IMAGE_FETCH_TIMEOUT_S, IMAGE_MAX_BYTES and IMAGE_MAX_PIXELS as the adapter takes them."""
        return DownloadLimits(
            timeout_s=self.image_fetch_timeout_s,
            max_bytes=self.image_max_bytes,
            max_pixels=self.image_max_pixels,
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
