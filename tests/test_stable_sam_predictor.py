"""The predictor: original-size masks, the embedding cache, multimask policy."""

import threading

import numpy as np
import pytest
import torch

from stable_sam import EmbeddingCache, ImageEmbedding, StableSamPredictor, build_stable_sam
from stable_sam.transforms import low_res_to_original, mask_to_low_res_logits

IMAGE = np.random.default_rng(0).integers(0, 255, size=(150, 320, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_stable_sam("mini")


def test_masks_come_back_at_the_original_image_size(model):
    out = StableSamPredictor(model).predict(IMAGE, box_xyxy=np.array([10, 10, 100, 90]))
    assert out.masks.shape == (1, 150, 320) and out.masks.dtype == bool
    assert out.low_res_logits.shape == (1, 64, 64)
    assert out.scores.shape == (1,) and out.alpha.shape == (2,)


def test_multimask_output_returns_three_masks_and_policy_best_keeps_the_top_one(model):
    predictor = StableSamPredictor(model, multimask_policy="best")
    three = predictor.predict(
        IMAGE, point_coords=[[50, 50]], point_labels=[1], multimask_output=True
    )
    best = predictor.predict(IMAGE, point_coords=[[50, 50]], point_labels=[1])
    assert three.masks.shape[0] == 3 and best.masks.shape[0] == 1
    assert best.scores[0] == pytest.approx(three.scores.max())


def test_auto_policy_uses_best_of_three_only_for_a_lone_click(model):
    auto = StableSamPredictor(model, multimask_policy="auto")
    single = StableSamPredictor(model, multimask_policy="single")
    best = StableSamPredictor(model, multimask_policy="best")
    click = dict(point_coords=[[50, 50]], point_labels=[1])
    assert auto.predict(IMAGE, **click).scores[0] == pytest.approx(
        best.predict(IMAGE, **click).scores[0]
    )
    box = dict(box_xyxy=[10, 10, 100, 90])
    assert auto.predict(IMAGE, **box).scores[0] == pytest.approx(
        single.predict(IMAGE, **box).scores[0]
    )


def test_a_batch_applies_the_policy_when_multimask_output_is_none(model):
    clicks = dict(point_coords=np.array([[[50, 50]], [[200, 100]]]), point_labels=np.ones((2, 1)))
    boxes = dict(boxes_xyxy=np.array([[10, 10, 100, 90], [150, 20, 300, 140]]))
    for policy, click_output in (("single", "single"), ("best", "best"), ("auto", "best")):
        predictor = StableSamPredictor(model, multimask_policy=policy)
        for prompt, output in (
            (clicks, click_output),
            (boxes, "best" if policy == "best" else "single"),
        ):
            batch = predictor.predict_batch(IMAGE, multimask_output=None, **prompt)
            three = predictor.predict_batch(IMAGE, multimask_output=True, **prompt)
            single = predictor.predict_batch(IMAGE, **prompt)
            expected = three.scores.max(axis=1) if output == "best" else single.scores[:, 0]
            assert batch.masks.shape[1] == 1 and three.masks.shape[1] == 3
            np.testing.assert_allclose(batch.scores[:, 0], expected, rtol=1e-6)


def test_embeddings_are_cached_by_content_not_by_array_identity(model):
    predictor = StableSamPredictor(model)
    predictor.predict(IMAGE, box_xyxy=[10, 10, 100, 90])
    predictor.predict(IMAGE.copy(), box_xyxy=[20, 20, 100, 90])
    assert predictor.cache.misses == 1 and predictor.cache.hits == 1
    predictor.predict(IMAGE[::-1].copy(), box_xyxy=[20, 20, 100, 90])
    assert predictor.cache.misses == 2


def test_plugins_share_the_base_embedding_cache(model):
    cache = EmbeddingCache()
    a = StableSamPredictor(model, cache=cache)
    b = StableSamPredictor(model, cache=cache)
    a.embed(IMAGE)
    b.embed(IMAGE)
    assert cache.misses == 1 and len(cache) == 1


def _fake_embedding(key: str, nbytes: int) -> ImageEmbedding:
    return ImageEmbedding(key, torch.zeros(nbytes // 4), None, (1, 1), (1, 1))


def test_cache_evicts_least_recently_used_past_its_byte_cap():
    cache = EmbeddingCache(max_bytes=1000)
    for key in "abc":
        cache.put(_fake_embedding(key, 400))
    assert "a" not in cache and "b" in cache and "c" in cache
    cache.get("b")
    cache.put(_fake_embedding("d", 400))
    assert "b" in cache and "c" not in cache and cache.nbytes == 800


def test_concurrent_requests_for_one_image_compute_it_once():
    cache = EmbeddingCache()
    calls = []
    gate = threading.Event()

    def compute():
        calls.append(1)
        gate.wait(5)
        return _fake_embedding("k", 8)

    threads = [threading.Thread(target=cache.get_or_compute, args=("k", compute)) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(cache) == 1


def test_low_res_upsampling_matches_sams_postprocess(model):
    from segment_anything.utils.transforms import ResizeLongestSide  # noqa: F401

    rng = np.random.default_rng(0)
    low = torch.as_tensor(rng.normal(size=(1, 1, 64, 64)).astype(np.float32))
    low = torch.nn.functional.avg_pool2d(low, 5, 1, 2)  # smooth logits, like a real decoder's
    ref = model.sam.postprocess_masks(low, (120, 256), (150, 320))[0, 0].numpy()
    ours = low_res_to_original(low[0, 0].numpy(), (150, 320), 256)
    agree = ((ref > 0) == (ours > 0)).mean()
    assert agree > 0.98 and np.abs(ref - ours).mean() < 0.05


def test_mask_prompt_round_trips_through_low_res_logits():
    mask = np.zeros((150, 320), bool)
    mask[30:90, 40:200] = True
    logits = mask_to_low_res_logits(mask, 256)
    assert logits.shape == (1, 64, 64)
    back = low_res_to_original(logits[0], (150, 320), 256) > 0
    assert (back == mask).mean() > 0.97


def test_bad_inputs_are_clear_errors(model):
    predictor = StableSamPredictor(model)
    with pytest.raises(ValueError, match="RGB"):
        predictor.embed(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        predictor.embed(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="at least one prompt"):
        predictor.predict(IMAGE)
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(IMAGE, point_coords=[[1, 1]])
