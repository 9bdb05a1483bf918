"""Fidelity on what a caption names, diversity over what it leaves open, and their intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines import shapes
from pipelines.shapes import Scene, ShapeObject
from training import open_eval

ROW = {"colour": "red", "shape": "circle", "size": "small", "position": "center", "background": "black"}


def test_fidelity_counts_named_attributes_and_diversity_the_open_ones():
    reference = {"background": math.log(4), "position": math.log(2), "size": math.log(2)}
    row = dict(ROW, **{shapes.NAMED_COLUMN: "colour shape size"})
    readings = [  # colour right 4/4, shape right 2/4, size right 3/4; four backgrounds, one position
        dict(ROW, background=b, shape=s, size=z)
        for b, s, z in zip(
            ("black", "white", "gray", "navy"), ("circle", "star", "circle", "star"), ("small",) * 3 + ("large",)
        )
    ]
    scores = open_eval.caption_scores(readings, row, reference)
    assert scores["hits"] == {"colour": 1.0, "shape": 0.5, "size": 0.75}
    assert scores["fidelity"] == pytest.approx((1 + 0.5 + 0.75) / 3)
    # background: entropy log 4 / log 4 = 1; position: always the centre = 0; size is named, not open
    assert scores["open_diversity"] == pytest.approx(0.5)


def test_an_image_without_an_object_misses_but_adds_no_diversity():
    reference = {a: math.log(2) for a in open_eval.OPEN}
    row = dict(ROW, **{shapes.NAMED_COLUMN: "colour shape background"})
    empty = dict.fromkeys(("colour", "shape", "size", "position"), None) | {"background": "black"}
    scores = open_eval.caption_scores([ROW, empty], row, reference)
    assert scores["hits"] == {"colour": 0.5, "shape": 0.5, "background": 1.0}
    assert scores["open_diversity"] == 0.0  # one object read: its size and position do not vary
    assert open_eval.caption_scores([empty, empty], row, reference)["open_diversity"] is None


def test_data_without_the_named_column_names_everything():
    scores = open_eval.caption_scores([ROW, ROW], ROW, {a: 1.0 for a in open_eval.OPEN})
    assert scores["fidelity"] == 1.0 and scores["open_diversity"] is None


def test_bootstrap_intervals_and_paired_differences():
    rng = np.random.default_rng(0)
    a = list(rng.normal(0.5, 0.1, size=40))
    low, high = open_eval.bootstrap_interval(a)
    assert low < np.mean(a) < high and high - low < 0.1
    assert open_eval.paired_difference(a, a) == {"mean": 0.0, "interval": [0.0, 0.0], "captions": 40}
    shifted = open_eval.paired_difference([x + 0.2 for x in a], a + [None])
    assert shifted["mean"] == pytest.approx(0.2) and shifted["interval"][0] > 0.19
    assert open_eval.paired_difference([None], [1.0]) is None


def test_prior_samples_take_the_attributes_of_their_nearest_training_image():
    train = [dict(ROW, background=b) for b in ("black", "white", "gray", "navy")]
    train_z = np.eye(4, dtype=np.float32)
    row = dict(ROW, **{shapes.NAMED_COLUMN: "colour shape"})
    spread = open_eval.prior_spread(train_z, [row], train_z, train, k=4)  # one sample near each image
    assert spread["fidelity"] == 1.0 and spread["open_diversity"] == pytest.approx(
        1.0
    )  # background only: size and position never vary here
    same = open_eval.prior_spread(np.repeat(train_z[:1], 4, axis=0), [row], train_z, train, k=4)
    assert same["open_diversity"] == 0.0


def test_read_image_reads_a_rendered_scene():
    scene = Scene("navy", (ShapeObject("square", "yellow", "large", "top left"),))
    assert open_eval.read_image(shapes.render(scene, 64)) == {
        "colour": "yellow",
        "shape": "square",
        "size": "large",
        "position": "top left",
        "background": "navy",
    }


def test_data_draws_reach_one_only_with_many_draws():
    rows = [dict(ROW, background=b, position=p) for b in ("black", "white") for p in ("center", "top left")] * 5
    few, many = open_eval.data_draws(rows, 2), open_eval.data_draws(rows, 64)
    assert few["size"] == 0.0  # one size in the data: nothing to spread over
    assert 0.3 < few["background"] < 0.7 < many["background"] <= 1.0  # 2 draws of a fair coin agree half the time
