"""The layering of docs/ARCHITECTURE.md, checked on the source: which package may import which,
the adapter free of torch and web frameworks, and no import cycle anywhere."""

from __future__ import annotations

from tests.import_graph import Import, cycles, imports, layer_violations, project_modules


def test_every_package_imports_only_the_floors_below_it():
    assert layer_violations(imports()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(imports()) == []


def test_training_and_the_adapter_import_nothing_from_backend():
    edges = imports()
    offending = [
        e
        for e in edges
        if e.source.split(".")[0] in {"training", "labelstudio", "runtime"}
        and e.target.split(".")[0] == "backend"
    ]
    assert offending == []


def test_the_graph_sees_imports_inside_functions():
    # A deferred import (inside a function) is a dependency all the same: the graph must see
    # them, or a cycle through one would go unnoticed.
    sources = {e.source for e in imports()}
    assert {"backend.app", "training.worker", "labelstudio.images"} <= sources
    assert len(project_modules()) > 50


def test_a_cycle_is_reported():
    edges = [
        Import("training.a", "training.b", 1),
        Import("training.b", "training.c", 1),
        Import("training.c", "training.a", 1),
        Import("training.c", "stable_sam.x", 2),
    ]
    assert cycles(edges) == [["training.a", "training.b", "training.c"]]


def test_an_upward_import_and_a_forbidden_framework_are_reported():
    edges = [
        Import("training.jobs", "backend.queue", 3),
        Import("labelstudio.images", "torch", 4),
        Import("backend.app", "runtime.settings", 5),
    ]
    assert layer_violations(edges) == [
        "training.jobs:3 imports backend.queue",
        "labelstudio.images:4 imports torch",
    ]


def test_our_training_package_shadows_the_one_sam2_installs(tmp_path):
    # sam2's sdist installs a top-level `training` (its own trainer) into site-packages. The
    # worker, the scripts and the Docker image put the repository on PYTHONPATH, ahead of it.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", "import sam2, training; print(training.__file__)"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(out.stdout.strip()) == root / "training" / "__init__.py"
