"""Labeling configs: the BrushLabels attached to the smart tool's Image, for any tag names, the
task-data key of every Image (the backend and the training job), the /setup store."""

from __future__ import annotations

import time

import pytest

from labelstudio.errors import InvalidRegionError, LabelConfigError
from labelstudio.label_config import LabelConfigStore, parse_label_config

SAM_CONFIG = """
<View>
  <Image name="photo" value="$picture" zoom="true"/>
  <BrushLabels name="segmentation" toName="photo">
    <Label value="Dog" background="#FF0000"/>
    <Label value="Cat" background="#0000FF"/>
  </BrushLabels>
  <KeyPointLabels name="clicks" toName="photo" smart="true">
    <Label value="Dog" smart="true"/><Label value="Cat" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="boxes" toName="photo" smart="true">
    <Label value="Dog"/><Label value="Cat"/>
  </RectangleLabels>
</View>
"""


def test_finds_the_brush_and_image_key_by_type_not_name():
    config = parse_label_config(SAM_CONFIG)
    brush = config.brush_for("photo", "Dog")
    assert brush.name == "segmentation" and brush.labels == ("Dog", "Cat")
    assert config.image_key("photo") == "picture"
    assert config.default_image_name() == "photo"
    smart = [c.name for c in config.controls if c.smart]
    assert smart == ["clicks", "boxes"]


def test_two_images_each_get_their_own_brush():
    config = parse_label_config(
        """<View><Image name="a" value="$left"/><Image name="b" value="$right"/>
        <BrushLabels name="mask_b" toName="b"><Label value="X"/></BrushLabels>
        <BrushLabels name="mask_a" toName="a"><Label value="X"/></BrushLabels>
        <KeyPointLabels name="kp" toName="a,b" smart="true"><Label value="X"/></KeyPointLabels>
        </View>"""
    )
    assert config.brush_for("a").name == "mask_a"
    assert config.brush_for("b").name == "mask_b"
    assert config.default_image_name() == "a"


def test_prefers_the_brush_that_offers_the_label():
    config = parse_label_config(
        """<View><Image name="img" value="$image"/>
        <BrushLabels name="animals" toName="img"><Label value="Dog"/></BrushLabels>
        <BrushLabels name="vehicles" toName="img"><Label value="Car"/></BrushLabels></View>"""
    )
    assert config.brush_for("img", "Car").name == "vehicles"
    assert config.brush_for("img", "Dog").name == "animals"


def test_a_label_no_brush_offers_is_refused_with_a_422():
    config = parse_label_config(SAM_CONFIG)
    with pytest.raises(InvalidRegionError, match="'Horse' is not a label of the <BrushLabels>"):
        config.brush_for("photo", "Horse")
    with pytest.raises(InvalidRegionError) as info:
        config.brush_for("photo", "dog")  # labels are case-sensitive in Label Studio
    assert info.value.status_code == 422 and "'Dog', 'Cat'" in info.value.detail


def test_no_brush_on_that_image_is_a_clear_error():
    config = parse_label_config(
        """<View><Image name="img" value="$image"/><Image name="other" value="$o"/>
        <BrushLabels name="m" toName="other"><Label value="A"/></BrushLabels>
        <KeyPointLabels name="kp" toName="img" smart="true"><Label value="A"/></KeyPointLabels>
        </View>"""
    )
    with pytest.raises(LabelConfigError, match='BrushLabels> with toName="img"'):
        config.brush_for("img", "A")


@pytest.mark.parametrize("xml", ["", "   ", "<View><Image", "not xml at all"])
def test_invalid_configs_raise(xml):
    with pytest.raises(LabelConfigError):
        parse_label_config(xml)


def test_entity_expansion_is_refused():
    bomb = '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>'
    with pytest.raises(LabelConfigError):
        parse_label_config(bomb)


def test_every_image_tag_maps_to_its_task_data_key():
    config = parse_label_config(
        """<View>
  <Image name="img" value="$image"/><Image name="second" value="$other"/>
  <PolygonLabels name="poly" toName="img"><Label value="Object"/></PolygonLabels>
</View>"""
    )
    assert config.image_data_keys == {"img": "image", "second": "other"}


def test_unknown_image_name_is_an_error():
    with pytest.raises(LabelConfigError, match="no <Image"):
        parse_label_config(SAM_CONFIG).image_key("nope")


def test_the_setup_config_store_keeps_the_most_recently_used_projects():
    store = LabelConfigStore(capacity=2)
    store.put("1", "<View>1</View>")
    store.put("2", "<View>2</View>")
    assert store.get("1") == "<View>1</View>"  # 1 is now the most recently used
    store.put("3", "<View>3</View>")
    assert len(store) == 2
    assert store.get("2") is None
    assert (store.get("1"), store.get("3")) == ("<View>1</View>", "<View>3</View>")


def test_a_deeply_nested_config_parses_in_linear_time():
    # 38,000 nested control tags (1 MB, under MAX_LABEL_CONFIG_BYTES) took 77 s when each
    # control collected its labels from all its descendants apart.
    depth = 20_000
    xml = (
        '<View><Image name="i" value="$img"/>'
        + '<C name="a" toName="i">' * depth
        + '<Label value="Car"/>'
        + "</C>" * depth
        + "</View>"
    )
    started = time.perf_counter()
    config = parse_label_config(xml)
    assert time.perf_counter() - started < 5.0
    assert len(config.controls) == depth
    assert config.controls[-1].labels == ("Car",)  # the nearest control gets the label
    assert config.controls[0].labels == ()


# -- which control a mask is written as -------------------------------------------------------

MIXED_CONFIG = """
<View>
  <Image name="img" value="$image"/>
  <BrushLabels name="brush" toName="img"><Label value="Road"/><Label value="Car"/></BrushLabels>
  <PolygonLabels name="poly" toName="img"><Label value="Car"/><Label value="Tree"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="img" smart="true">
    <Label value="Road"/><Label value="Car"/><Label value="Tree"/></KeyPointLabels>
</View>
"""


def test_a_label_both_tags_offer_is_written_as_a_brush():
    assert parse_label_config(MIXED_CONFIG).mask_control_for("img", "Car").name == "brush"


def test_a_label_only_polygons_offer_is_written_as_a_polygon():
    control = parse_label_config(MIXED_CONFIG).mask_control_for("img", "Tree")
    assert (control.tag, control.name) == ("polygonlabels", "poly")


def test_a_polygon_only_project_writes_polygons():
    config = parse_label_config(SAM_CONFIG.replace("BrushLabels", "PolygonLabels"))
    assert config.mask_control_for("photo", "Dog").tag == "polygonlabels"
    assert config.mask_control_for("photo").tag == "polygonlabels"


def test_a_label_neither_offers_is_a_422_naming_both_tags_labels():
    with pytest.raises(InvalidRegionError) as info:
        parse_label_config(MIXED_CONFIG).mask_control_for("img", "Horse")
    assert "'Road', 'Car', 'Tree'" in info.value.detail
    assert "<BrushLabels> or <PolygonLabels>" in info.value.detail


def test_an_image_without_brush_or_polygon_labels_is_a_config_error():
    config = parse_label_config(SAM_CONFIG.replace("BrushLabels", "EllipseLabels"))
    with pytest.raises(LabelConfigError, match="no <BrushLabels> or <PolygonLabels>"):
        config.mask_control_for("photo", "Dog")
