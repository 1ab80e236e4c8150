"""The models a user study compares, built from names on the command line.

- ``sam``: the embedded default base (``stable_sam.default_model_paths()``) without plugins;
- ``stable-sam``: the same base with the shipped plugins;
- ``hq-sam``: HQ-SAM, only with ``hq_checkpoint`` (an official HQ-SAM ``.pth``);
- ``project:<path>``: the base with a plugin file, e.g. a project-trained version
  (``VERSIONS_DIR/<project>/<version>.safetensors``), or ``project:VERSIONS_DIR/<project>`` for
  that project's current (newest promoted) version from ``runtime.versions``;
- ``dt-sam:<path>`` / ``pt-sam:<path>`` / ``hq-sam:<path>`` / ``pa-sam:<path>``: the plain base
  with a DT-SAM decoder file, PT-SAM tokens file, HQ-SAM parameters file or PA-SAM adapter file
  trained on it (``python -m training.train --variant dt-sam|pt-sam|hq-sam|pa-sam --out <path>``).

``base_type`` / ``base_checkpoint`` replace the embedded default base (e.g. an official
``vit_l`` checkpoint); the shipped plugins only fit the base they were trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from training.evaluation import EvalModel

logger = logging.getLogger(__name__)

# ``<variant>:<file>`` models: the trained baselines of ``training.baselines`` on the base.
TRAINED_BASELINES = {
    "dt-sam": "decoder fine-tuned",
    "pt-sam": "tokens fine-tuned",
    "hq-sam": "HQ-SAM parameters trained",
    "pa-sam": "PA-SAM prompt adapter trained",
}


def model_names(spec: str) -> list[str]:
    """The model names of a ``--models`` value: a comma list, or ``none`` for no models."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    return [] if names == ["none"] else names


def build_models(
    names: list[str],
    *,
    base_type: str | None = None,
    base_checkpoint: str | Path | None = None,
    hq_checkpoint: str | Path | None = None,
    hq_model_type: str = "hq_vit_l",
    device: str | None = None,
    allow_random_base: bool = False,
) -> dict[str, EvalModel]:
    """Build one model per name (see the module docstring); raises on an unknown name.

    Without ``base_type`` the embedded default (``stable_sam.default_model_paths()``) is the
    base; if its files are missing this raises ``FileNotFoundError``, unless
    ``allow_random_base`` (the demo), which builds a randomly initialised base (or untrained
    plugins) instead and says so in every description. No names: no models, nothing checked.
    """
    if not names:
        return {}
    from stable_sam import StableSamPredictor, build_stable_sam, default_model_paths

    defaults = default_model_paths()
    shipped_plugins: Path | None = defaults.plugin_checkpoint
    if base_type is None:
        base_type = defaults.model_type
        if base_checkpoint is None:
            base_checkpoint = defaults.base_checkpoint
            if not Path(base_checkpoint).is_file():
                if not allow_random_base:
                    raise FileNotFoundError(f"embedded default base missing: {base_checkpoint}")
                logger.warning("embedded default base missing: RANDOM weights, numbers meaningless")
                base_checkpoint, shipped_plugins = None, None
    out: dict[str, EvalModel] = {}
    for name in names:
        if name == "sam":
            model = build_stable_sam(base_type, base_checkpoint, plugins=False, device=device)
            description = f"SAM {base_type} ({_name(base_checkpoint)}), no plugins"
        elif name == "stable-sam":
            if shipped_plugins is not None and not shipped_plugins.is_file():
                if not allow_random_base:
                    raise FileNotFoundError(f"shipped plugin file missing: {shipped_plugins}")
                logger.warning("shipped plugin file missing: UNTRAINED plugins (equal to SAM)")
                shipped_plugins = None
            model = build_stable_sam(
                base_type,
                base_checkpoint,
                plugins=True,
                plugin_checkpoint=shipped_plugins,
                device=device,
            )
            description = f"Stable-SAM: {base_type} ({_name(base_checkpoint)}) + plugins ({_name(shipped_plugins)})"
        elif name == "hq-sam":
            if hq_checkpoint is None:
                raise ValueError("model 'hq-sam' needs --hq-checkpoint (an HQ-SAM .pth)")
            model = build_stable_sam(hq_model_type, hq_checkpoint, plugins=False, device=device)
            description = f"HQ-SAM {hq_model_type} ({_name(hq_checkpoint)})"
        elif name.startswith(tuple(f"{kind}:" for kind in TRAINED_BASELINES)):
            from training.baselines import VARIANTS

            kind, path = name.split(":", 1)
            model = VARIANTS[kind].build_model(base_type, base_checkpoint, device)
            VARIANTS[kind].load(model, path)
            what = TRAINED_BASELINES[kind]
            description = f"{kind.upper()}: {base_type} ({_name(base_checkpoint)}), {what} ({path})"
        elif name.startswith("project:"):
            path = project_plugin_file(name.split(":", 1)[1])
            model = build_stable_sam(
                base_type, base_checkpoint, plugins=True, plugin_checkpoint=path, device=device
            )
            description = (
                f"Stable-SAM: {base_type} ({_name(base_checkpoint)}) + project plugins {path}"
            )
        else:
            raise ValueError(
                f"unknown model {name!r}; expected sam, stable-sam, hq-sam, project:<plugin file>, "
                "dt-sam:<decoder file>, pt-sam:<tokens file>, hq-sam:<HQ-SAM parameters file> or "
                "pa-sam:<PA-SAM adapter file>"
            )
        logger.info("user study model %s: %s", name, description)
        out[name] = EvalModel(name, StableSamPredictor(model), description=description)
    return out


def project_plugin_file(spec: str) -> Path:
    """A plugin file, or a project's folder in the version store (``VERSIONS_DIR/<project>``),
    which means that project's current (newest promoted) version."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        from runtime.versions import LocalVersionStore

        store = LocalVersionStore(path.parent)
        version = store.current(path.name)
        if version is None:
            raise FileNotFoundError(
                f"project {path.name} has no promoted version under {path.parent}"
            )
        logger.info("project %s: current version %s", path.name, version.name)
        return store.plugin_file(version)
    raise FileNotFoundError(f"plugin file or project version folder not found: {spec}")


def _name(path: str | Path | None) -> str:
    return Path(path).name if path else "RANDOM / untrained weights"
