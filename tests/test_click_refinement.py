"""Refinement across clicks: the prompt-extension rule, the bounded memory, and ``/predict``
passing the previous answer as ``mask_input`` exactly when a prompt extends a remembered one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backend_support import CONFIG, FakeLabelStudio, H, W, box, kp, png_bytes, scene

from backend.click_refinement import AUTO, ClickRefinement
from backend.ls_backend import StableSamBackend
from runtime.settings import Settings
from stable_sam import EmbeddingCache, ImageEmbedding
from stable_sam.refinement import ClickMemory, PromptKey

# -- the rule ------------------------------------------------------------------------------------


def key(*points, box=None):
    """A PromptKey from (x, y, label) points in placement order and an optional box."""
    xy = np.array([p[:2] for p in points], np.float32) if points else None
    labels = np.array([p[2] for p in points]) if points else None
    return PromptKey.of(xy, labels, None if box is None else np.array(box, np.float32))


def logits(value: float) -> np.ndarray:
    return np.full((1, 4, 4), value, np.float32)


def test_one_more_point_extends_the_prompt_before_it():
    assert key((1, 2, 1), (5, 6, 0)).parent() == key((1, 2, 1))
    assert key((1, 2, 1), box=(0, 0, 9, 9)).parent() == key(box=(0, 0, 9, 9))


def test_a_first_click_or_a_box_alone_extends_nothing():
    assert key((1, 2, 1)).parent() is None
    assert key(box=(0, 0, 9, 9)).parent() is None


def test_the_same_click_resent_as_float_noise_is_the_same_prompt():
    assert key((10.0000001, 20.0, 1)) == key((10.0, 20.0000002, 1))
    assert key((10.0, 20.0, 1)) != key((10.5, 20.0, 1))
    assert key((10.0, 20.0, 1)) != key((10.0, 20.0, 0))  # the same place, the other label


def test_the_first_prompt_of_a_chain_is_a_box_when_it_holds_one():
    assert key((1, 2, 1), box=(0, 0, 9, 9)).first_prompt == "box"
    assert key((1, 2, 1), (3, 4, 1)).first_prompt == "click"


def test_memory_recalls_the_answer_to_the_prompt_extended():
    memory = ClickMemory(max_bytes=1 << 20)
    memory.remember("img", "scope", key((1, 1, 1)), logits(1))
    recalled = memory.recall("img", "scope", key((1, 1, 1), (2, 2, 0)))
    assert recalled is not None and recalled.shape == (1, 4, 4) and recalled[0, 0, 0] == 1


def test_removing_the_last_point_never_reuses_the_longer_prompts_answer():
    memory = ClickMemory(max_bytes=1 << 20)
    memory.remember("img", "s", key((1, 1, 1)), logits(1))
    memory.remember("img", "s", key((1, 1, 1), (2, 2, 1)), logits(2))
    memory.remember("img", "s", key((1, 1, 1), (2, 2, 1), (3, 3, 0)), logits(3))
    # Back to two points: refined from the one-point answer, as when they were first placed.
    assert memory.recall("img", "s", key((1, 1, 1), (2, 2, 1)))[0, 0, 0] == 1
    # The first point removed: the remaining one extends nothing.
    assert memory.recall("img", "s", key((2, 2, 1))) is None


def test_a_new_box_starts_fresh():
    memory = ClickMemory(max_bytes=1 << 20)
    memory.remember("img", "s", key(box=(0, 0, 9, 9)), logits(1))
    assert memory.recall("img", "s", key((4, 4, 1), box=(0, 0, 9, 9))) is not None
    assert memory.recall("img", "s", key((4, 4, 1), box=(1, 0, 9, 9))) is None


def test_scopes_and_images_never_mix():
    memory = ClickMemory(max_bytes=1 << 20)
    memory.remember("img", ("task 1", "Car"), key((1, 1, 1)), logits(1))
    assert memory.recall("img", ("task 1", "Tree"), key((1, 1, 1), (2, 2, 1))) is None
    assert memory.recall("img", ("task 2", "Car"), key((1, 1, 1), (2, 2, 1))) is None
    assert memory.recall("other", ("task 1", "Car"), key((1, 1, 1), (2, 2, 1))) is None


def test_two_annotators_on_one_object_keep_their_own_chains():
    memory = ClickMemory(max_bytes=1 << 20)
    memory.remember("img", "s", key((1, 1, 1)), logits(1))  # annotator A's first click
    memory.remember("img", "s", key((7, 7, 1)), logits(7))  # annotator B's first click
    assert memory.recall("img", "s", key((1, 1, 1), (2, 2, 1)))[0, 0, 0] == 1
    assert memory.recall("img", "s", key((7, 7, 1), (8, 8, 0)))[0, 0, 0] == 7


def test_memory_is_bounded_in_bytes_least_recently_used_first():
    one = logits(0).nbytes
    memory = ClickMemory(max_bytes=2 * one)
    memory.remember("img", "s", key((1, 1, 1)), logits(1))
    memory.remember("img", "s", key((2, 2, 1)), logits(2))
    memory.recall("img", "s", key((1, 1, 1), (9, 9, 1)))  # (1, 1) is now the most recent
    memory.remember("img", "s", key((3, 3, 1)), logits(3))
    assert len(memory) == 2 and memory.nbytes == 2 * one
    assert memory.recall("img", "s", key((2, 2, 1), (9, 9, 1))) is None
    assert memory.recall("img", "s", key((1, 1, 1), (9, 9, 1))) is not None


def test_an_images_answers_go_when_its_embedding_leaves_the_cache():
    def embedding(name: str) -> ImageEmbedding:
        tensor = torch.zeros(1, 256, 16, 16)
        return ImageEmbedding(name, tensor, None, (64, 64), (64, 64))

    cache = EmbeddingCache(max_bytes=embedding("x").nbytes)  # room for one
    memory = ClickMemory(max_bytes=1 << 20)
    cache.on_evict(memory.forget_image)
    cache.put(embedding("a"))
    memory.remember("a", "s", key((1, 1, 1)), logits(1))
    memory.remember("b", "s", key((1, 1, 1)), logits(2))
    cache.put(embedding("b"))  # evicts "a"
    assert memory.recall("a", "s", key((1, 1, 1), (2, 2, 1))) is None
    assert memory.recall("b", "s", key((1, 1, 1), (2, 2, 1))) is not None
    cache.clear()
    assert len(memory) == 0


def test_refinement_modes():
    chain = key((1, 1, 1), (2, 2, 1))
    memory = ClickMemory(max_bytes=1 << 20)
    memory.remember("img", "s", key((1, 1, 1)), logits(1))
    assert ClickRefinement("on", "sam", memory).mask_input("img", "s", chain) is not None
    assert ClickRefinement("off", "sam", memory).mask_input("img", "s", chain) is None
    for model in ("sam", "stable_sam"):
        auto = ClickRefinement("auto", model, memory)
        assert (auto.mask_input("img", "s", chain) is not None) == AUTO[(model, "click")]
    with pytest.raises(ValueError, match="unknown refinement mode"):
        ClickRefinement("sometimes", "sam", memory)  # type: ignore[arg-type]


# -- /predict ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ls():
    with FakeLabelStudio() as server:
        server.files["scene.png"] = png_bytes(scene(H, W)[0])
        yield server


def make_backend(ls, tmp_path, random_mini_base, mode="on", **overrides) -> StableSamBackend:
    settings = Settings(
        label_studio_url=ls.url,
        sam_model_type="mini",
        sam_checkpoint=random_mini_base,
        sam_plugins="none",
        preload_model=False,
        prefetch_workers=0,
        device="cpu",
        refine_masks=mode,
        versions_dir=tmp_path / "versions",
        **overrides,
    )
    return StableSamBackend(settings)


class Recorder:
    """Wraps the backend's predictor: records each call's mask_input and answer logits."""

    def __init__(self, backend: StableSamBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[np.ndarray | None, np.ndarray]] = []
        predictor = backend.models.predictor()
        real = predictor.predict

        def predict(*args, **kwargs):
            prediction = real(*args, **kwargs)
            self.calls.append((kwargs.get("mask_input"), prediction.low_res_logits[0].copy()))
            return prediction

        monkeypatch.setattr(predictor, "predict", predict)

    def mask_input(self, call: int) -> np.ndarray | None:
        return self.calls[call][0]

    def answer(self, call: int) -> np.ndarray:
        return self.calls[call][1]


def click(backend: StableSamBackend, regions: list[dict], task_id: int = 11) -> list[dict]:
    task = {"id": task_id, "data": {"img": "/public/scene.png"}}
    return backend.predict([task], {"result": regions}, "1.1700000000", CONFIG)


@pytest.fixture
def backend(ls, tmp_path, random_mini_base, one_torch_thread):
    backend = make_backend(ls, tmp_path, random_mini_base)
    yield backend
    backend.close()


def test_the_next_click_is_refined_with_the_previous_answer(backend, monkeypatch):
    calls = Recorder(backend, monkeypatch)
    first, second = kp(50, 50), kp(30, 40, positive=False)
    click(backend, [first])
    click(backend, [first, second])
    assert calls.mask_input(0) is None
    np.testing.assert_array_equal(calls.mask_input(1), calls.answer(0)[None])


def test_removing_a_point_refines_from_the_answer_before_it(backend, monkeypatch):
    calls = Recorder(backend, monkeypatch)
    a, b, c = kp(50, 50), kp(30, 40, positive=False), kp(60, 60)
    click(backend, [a])
    click(backend, [a, b])
    click(backend, [a, b, c])
    click(backend, [a, b])  # c removed
    np.testing.assert_array_equal(calls.mask_input(3), calls.answer(0)[None])
    np.testing.assert_array_equal(calls.answer(3), calls.answer(1))  # the same answer as before
    click(backend, [b, c])  # a removed: nothing is extended
    assert calls.mask_input(4) is None


def test_a_label_switch_starts_fresh(backend, monkeypatch):
    calls = Recorder(backend, monkeypatch)
    click(backend, [kp(50, 50, label="Car")])
    click(backend, [kp(50, 50, label="Tree"), kp(30, 40, label="Tree")])
    assert calls.mask_input(1) is None


def test_a_new_box_starts_fresh_and_a_click_in_it_is_refined(backend, monkeypatch):
    calls = Recorder(backend, monkeypatch)
    click(backend, [box(20, 20, 50, 50)])
    click(backend, [box(25, 20, 50, 50), kp(40, 40)])  # another box
    click(backend, [box(25, 20, 50, 50), kp(40, 40), kp(70, 70, positive=False)])
    assert calls.mask_input(1) is None
    np.testing.assert_array_equal(calls.mask_input(2), calls.answer(1)[None])


def test_two_annotators_on_one_task_refine_their_own_masks(backend, monkeypatch):
    calls = Recorder(backend, monkeypatch)
    a1, a2 = kp(50, 50), kp(55, 45)
    b1, b2 = kp(20, 30), kp(25, 35, positive=False)
    click(backend, [a1])  # 0: annotator A
    click(backend, [b1])  # 1: annotator B, same task and label
    click(backend, [a1, a2])  # 2
    click(backend, [b1, b2])  # 3
    np.testing.assert_array_equal(calls.mask_input(2), calls.answer(0)[None])
    np.testing.assert_array_equal(calls.mask_input(3), calls.answer(1)[None])


def test_another_task_with_the_same_image_starts_fresh(backend, monkeypatch):
    calls = Recorder(backend, monkeypatch)
    click(backend, [kp(50, 50)], task_id=11)
    click(backend, [kp(50, 50), kp(30, 40)], task_id=12)
    assert calls.mask_input(1) is None


def test_refinement_off_never_passes_a_mask(ls, tmp_path, random_mini_base, monkeypatch):
    backend = make_backend(ls, tmp_path, random_mini_base, mode="off")
    calls = Recorder(backend, monkeypatch)
    click(backend, [kp(50, 50)])
    click(backend, [kp(50, 50), kp(30, 40)])
    assert calls.mask_input(1) is None
    assert len(backend.models.click_memory) == 0
    backend.close()


def test_an_evicted_embedding_takes_its_answers_along(ls, tmp_path, random_mini_base, monkeypatch):
    backend = make_backend(ls, tmp_path, random_mini_base)
    calls = Recorder(backend, monkeypatch)
    click(backend, [kp(50, 50)])
    assert len(backend.models.click_memory) == 1
    backend.models.predictor().cache.clear()
    assert len(backend.models.click_memory) == 0
    click(backend, [kp(50, 50), kp(30, 40)])
    assert calls.mask_input(1) is None
    backend.close()
