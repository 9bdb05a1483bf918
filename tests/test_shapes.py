"""The vocabulary, renderer and pixel checker agree with each other, through JPEG."""

from __future__ import annotations

import io
import itertools
import re

import numpy as np
import pytest
from PIL import Image

from pipelines import shapes
from pipelines.shapes import Scene, ShapeObject


def _jpeg_roundtrip(image: Image.Image) -> Image.Image:
    return Image.open(io.BytesIO(shapes.encode_jpeg(image)))


def test_vocabulary_is_as_large_as_promised():
    assert len(shapes.SHAPES) >= 6 and len(shapes.COLOURS) == 8
    assert len(shapes.SIZES) == 2 and len(shapes.POSITIONS) == 5 and len(shapes.BACKGROUNDS) >= 3


def test_checker_reads_every_single_object_combination():
    backgrounds = itertools.cycle(shapes.BACKGROUNDS)
    wrong = []
    for shape, colour, size, position in itertools.product(
        shapes.SHAPES, shapes.COLOURS, shapes.SIZES, shapes.POSITIONS
    ):
        background = next(b for b in backgrounds if colour in shapes.colours_allowed_on(b))
        scene = Scene(background, (ShapeObject(shape, colour, size, position),))
        image = _jpeg_roundtrip(shapes.render(scene, 64))
        found = shapes.detect(image)
        got = (found[0].shape, found[0].colour, found[0].size, found[0].position) if found else None
        if got != (shape, colour, size, position) or shapes.detect_background(image) != background:
            wrong.append(((shape, colour, size, position, background), got))
    assert wrong == []


def test_checker_says_no_to_other_attributes():
    image = shapes.render(Scene("gray", (ShapeObject("circle", "red", "large", "top left"),)))
    assert shapes.shows(image, colour="red", shape="circle", size="large", position="top left", background="gray")
    assert not shapes.shows(image, colour="blue")
    assert not shapes.shows(image, shape="square")
    assert not shapes.shows(image, position="bottom right")
    assert not shapes.shows(image, size="small")
    assert not shapes.shows(image, background="white")
    assert shapes.detect(Image.new("RGB", (64, 64), shapes.BACKGROUNDS["gray"])) == []


def test_checker_finds_both_objects_of_sampled_two_object_scenes():
    rng = np.random.default_rng(7)
    for _ in range(60):
        scene = shapes.sample_scene(rng, n_objects=2)
        image = _jpeg_roundtrip(shapes.render(scene))
        for obj in scene.objects:
            assert shapes.shows(image, colour=obj.colour, shape=obj.shape, size=obj.size, position=obj.position), scene


def test_attribute_accuracy_scores_each_attribute():
    obj = ShapeObject("star", "cyan", "large", "center")
    image = shapes.render(Scene("navy", (obj,)))
    assert shapes.attribute_accuracy(image, obj) == dict.fromkeys(("colour", "shape", "size", "position"), True)
    other = ShapeObject("star", "red", "large", "top left")
    assert shapes.attribute_accuracy(image, other) == {"colour": False, "shape": True, "size": True, "position": False}


def test_render_is_deterministic_and_sized():
    scene = Scene("white", (ShapeObject("triangle", "blue", "small", "bottom left", 0.01, -0.02),))
    a, b = shapes.render(scene, 48), shapes.render(scene, 48)
    assert a.size == (48, 48) and a.tobytes() == b.tobytes()
    assert shapes.encode_jpeg(a) == shapes.encode_jpeg(b)


@pytest.mark.parametrize("heldout", [False, True])
def test_sampler_keeps_heldout_pairs_apart(heldout):
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = shapes.sample_scene(rng, n_objects=1 if heldout else 2, heldout=heldout)
        for obj in scene.objects:
            assert ((obj.colour, obj.shape) in shapes.HELDOUT_PAIRS) == heldout
            assert obj.colour in shapes.colours_allowed_on(scene.background)


def _words_of(attribute: str, value: str) -> tuple[str, ...]:
    """Every phrase a caption may use for `value` of `attribute`."""
    return {
        "colour": (value,),
        "shape": shapes.SHAPE_WORDS.get(value, ()),
        "size": shapes.SIZE_WORDS.get(value, ()),
        "position": shapes.POSITION_WORDS.get(value, ()),
        "background": (value,),
    }[attribute]


def test_the_canonical_caption_names_everything_in_one_wording():
    obj = ShapeObject("cross", "orange", "small", "center")
    assert shapes.caption(Scene("black", (obj,))) == "a small orange cross in the center on a black background"
    assert shapes.caption(Scene("black", (obj,)), {"colour", "shape"}) == "an orange cross"


def test_captions_name_exactly_the_chosen_attributes_in_varied_wording():
    rng = np.random.default_rng(3)
    texts, counts = set(), dict.fromkeys(shapes.NAMEABLE, 0)
    n = 600
    for _ in range(n):
        scene = shapes.sample_scene(rng, n_objects=1)
        named = shapes.choose_named(scene, rng)
        text = shapes.caption(scene, named, rng)
        texts.add(text.split(" ")[0] + " " + text.split(" ")[-1])  # crude signature of the word order
        obj = scene.objects[0]
        values = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "position": obj.position}
        values["background"] = scene.background
        assert {"colour", "shape"} & set(named), text
        for attribute, value in values.items():
            said = any(re.search(rf"\b{re.escape(word)}\b", text) for word in _words_of(attribute, value))
            assert said == (attribute in named), (attribute, named, text)
            counts[attribute] += attribute in named
    for attribute, p in shapes.NAMING.items():
        if attribute in counts:  # the shape is added when neither colour nor shape was drawn
            assert abs(counts[attribute] / n - p) < 0.06 + (attribute == "shape") * 0.01, (attribute, counts)
    assert len(texts) > 20


def test_two_object_captions_sometimes_mention_one_object():
    rng = np.random.default_rng(4)
    mentions = []
    for _ in range(300):
        scene = shapes.sample_scene(rng, n_objects=2)
        named = shapes.choose_named(scene, rng)
        mentions.append(any(a.endswith("_2") for a in named))
        if not mentions[-1]:
            text = shapes.caption(scene, named, rng)
            assert not any(w in text for w in ("and", "next to")), text
    assert abs(np.mean(mentions) - shapes.NAMING["second_object"]) < 0.08
