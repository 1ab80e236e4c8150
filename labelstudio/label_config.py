"""What the service needs from a project's labeling config (Label Studio XML).

Tags are found by type, never by name: the ``BrushLabels`` (or, without one offering the label,
``PolygonLabels``) control that writes masks onto the same ``Image`` as the smart tool the
annotator clicked with (the backend), and the task-data key
of each ``Image`` (``value="$image"`` -> ``"image"``: the backend and the training job). The
XML is parsed with ``defusedxml`` because the config comes over the network.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from xml.etree.ElementTree import Element

from defusedxml import ElementTree as SafeET

from labelstudio.errors import InvalidRegionError, LabelConfigError, quoted

# The tags a mask can be written as, in order of preference, and how the config spells them.
MASK_CONTROLS = ("brushlabels", "polygonlabels")
TAG_TITLES = {"brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels"}


@dataclass(frozen=True)
class ControlTag:
    """One control tag of the config: ``<BrushLabels name=.. toName=..>`` and its labels."""

    tag: str  # lower-case tag type, e.g. "brushlabels"
    name: str
    to_name: tuple[str, ...]
    labels: tuple[str, ...]
    smart: bool


@dataclass(frozen=True)
class LabelConfig:
    """The parsed config: control tags and the data key of every object (``Image``) tag."""

    controls: tuple[ControlTag, ...]
    image_data_keys: dict[str, str]  # Image tag name -> task data key (without "$")

    def brush_for(self, to_name: str, label: str | None = None) -> ControlTag:
        """The ``BrushLabels`` control attached to the ``Image`` named ``to_name`` (offering
        ``label``, when given); errors as ``mask_control_for``."""
        return self._control_for(to_name, label, ("brushlabels",))

    def mask_control_for(self, to_name: str, label: str | None = None) -> ControlTag:
        """The control a mask for ``label`` on the ``Image`` named ``to_name`` is written as:
        the ``BrushLabels`` offering the label, else the ``PolygonLabels`` offering it (Label
        Studio shows a region only under a label of its own control).

        Raises ``LabelConfigError`` when the image has neither tag, ``InvalidRegionError``
        (422) when none of them offers ``label``.
        """
        return self._control_for(to_name, label, MASK_CONTROLS)

    def _control_for(self, to_name: str, label: str | None, tags: tuple[str, ...]) -> ControlTag:
        candidates = [
            c for tag in tags for c in self.controls if c.tag == tag and to_name in c.to_name
        ]
        if not candidates:
            names = " or ".join(f"<{TAG_TITLES[t]}>" for t in tags)
            raise LabelConfigError(
                f'the labeling config has no {names} with toName="{to_name}"; add one next '
                "to the smart KeyPointLabels/RectangleLabels so the backend can return masks"
            )
        if label is None:
            return candidates[0]
        for control in candidates:
            if label in control.labels:
                return control
        offered = list(dict.fromkeys(value for c in candidates for value in c.labels))
        shown = ", ".join(repr(value) for value in offered[:10])
        if len(offered) > 10:
            shown += ", ..."
        names = " or ".join(f"<{TAG_TITLES[t]}>" for t in {c.tag: 0 for c in candidates})
        raise InvalidRegionError(
            f"label {quoted(label)} is not a label of the {names} on image {to_name!r} "
            f"(it offers {shown or 'none'}); add it to the labeling config or pick another label"
        )

    def box_conversion_warnings(self) -> list[str]:
        """What a project's boxes -> masks conversion will leave out, one line each: the labels
        of a ``RectangleLabels`` no mask tag offers. Raises ``LabelConfigError`` when nothing
        can be converted: no ``RectangleLabels``, or none with a mask tag on its image."""
        rectangles = [c for c in self.controls if c.tag == "rectanglelabels"]
        if not rectangles:
            raise LabelConfigError(
                "the labeling config has no <RectangleLabels>: a box conversion turns the "
                "project's rectangles into masks; add the RectangleLabels the boxes were drawn "
                "with"
            )
        warnings, convertible = [], False
        for rectangle in rectangles:
            for to_name in rectangle.to_name:
                masks = [
                    c for c in self.controls if c.tag in MASK_CONTROLS and to_name in c.to_name
                ]
                if not masks:
                    warnings.append(
                        f"<RectangleLabels name={rectangle.name!r}> on image {to_name!r}: no "
                        "<BrushLabels> or <PolygonLabels> there, its boxes are skipped"
                    )
                    continue
                offered = {label for c in masks for label in c.labels}
                missing = [label for label in rectangle.labels if label not in offered]
                convertible = convertible or len(missing) < len(rectangle.labels)
                if missing:
                    warnings.append(
                        f"labels {', '.join(quoted(m) for m in missing[:10])} of "
                        f"<RectangleLabels name={rectangle.name!r}> have no mask label on image "
                        f"{to_name!r}: their boxes are skipped"
                    )
        if not convertible:
            raise LabelConfigError(
                "no label of the labeling config's <RectangleLabels> is offered by a "
                "<BrushLabels> or <PolygonLabels> on the same image: " + "; ".join(warnings)
            )
        return warnings

    def image_key(self, to_name: str) -> str:
        """The task data key holding the URL of the ``Image`` named ``to_name``."""
        if to_name not in self.image_data_keys:
            raise LabelConfigError(f'the labeling config has no <Image name="{to_name}">')
        return self.image_data_keys[to_name]

    def default_image_name(self) -> str | None:
        """The ``Image`` to segment when no region names one: one with BrushLabels, or the first."""
        for name in self.image_data_keys:
            if any(c.tag == "brushlabels" and name in c.to_name for c in self.controls):
                return name
        return next(iter(self.image_data_keys), None)


@lru_cache(maxsize=64)
def parse_label_config(xml: str) -> LabelConfig:
    """Parse a labeling config; raises ``LabelConfigError`` for XML that does not parse."""
    if not xml or not xml.strip():
        raise LabelConfigError("the labeling config is empty")
    try:
        root = SafeET.fromstring(xml)
    except Exception as exc:  # defusedxml raises ParseError or its own DefusedXmlException
        raise LabelConfigError(f"the labeling config is not valid XML: {exc}") from exc
    # One walk, each <Label> counted for its nearest enclosing control tag: linear in the
    # config's size (collecting every control's descendants apart was quadratic: 38,000 nested
    # tags in 1 MB took 77 s). Iterative, so deep nesting cannot exhaust the stack.
    found: list[tuple[Element, list[str]]] = []  # (control element, its labels)
    images: dict[str, str] = {}
    stack: list[tuple[Element, list[str] | None]] = [(root, None)]
    while stack:
        element, labels = stack.pop()
        tag = element.tag.lower() if isinstance(element.tag, str) else ""
        attrib = element.attrib
        if tag == "image" and "name" in attrib:
            images[attrib["name"]] = attrib.get("value", "").lstrip("$")
        elif tag == "label" and "value" in attrib and labels is not None:
            labels.append(attrib["value"])
        elif "toName" in attrib and "name" in attrib:
            labels = []
            found.append((element, labels))
        stack.extend((child, labels) for child in reversed(element))
    controls = [
        ControlTag(
            tag=element.tag.lower(),
            name=element.attrib["name"],
            to_name=tuple(n.strip() for n in element.attrib["toName"].split(",") if n.strip()),
            labels=tuple(labels),
            smart=element.attrib.get("smart", "").lower() == "true"
            or element.attrib.get("smartOnly", "").lower() == "true",
        )
        for element, labels in found
    ]
    return LabelConfig(controls=tuple(controls), image_data_keys=images)


class LabelConfigStore:
    """The labeling config each project last sent to ``/setup``, for ``/predict`` calls without one.

    Bounded to the ``capacity`` most recently used projects (thread-safe): ``/setup`` needs no
    credentials, so a caller inventing project ids must not grow memory. A project whose config
    was dropped is served again after its next ``/setup``, which Label Studio calls constantly.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._configs: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, project: str, xml: str) -> None:
        """Remember ``xml`` for ``project``, dropping the least recently used beyond capacity."""
        with self._lock:
            self._configs[project] = xml
            self._configs.move_to_end(project)
            while len(self._configs) > self.capacity:
                self._configs.popitem(last=False)

    def get(self, project: str) -> str | None:
        """The config of ``project`` (now the most recently used), or ``None``."""
        with self._lock:
            xml = self._configs.get(project)
            if xml is not None:
                self._configs.move_to_end(project)
            return xml

    def __len__(self) -> int:
        with self._lock:
            return len(self._configs)
