"""Every config is checked when loaded: each kind of mistake is an error that names it."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from embeddings.config import ConfigError, parse_overrides, parse_yaml
from pipelines.data_config import load_data_config, run_data
from pipelines.download import check_shard_splits, read_url_list

from .conftest import REPO


def _write(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_configs_load():
    for name in ("synthetic", "tiny"):
        config = load_data_config(REPO / f"configs/data/{name}.yaml")
        assert config.name == name and config.synthetic["n_samples"] > 0


def test_example_config_names_its_missing_url_list():
    with pytest.raises(ConfigError, match="URL list not found: /path/to/cc3m.parquet"):
        load_data_config(REPO / "configs/data/example_url_list.yaml")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "colour": 3}, "unknown key 'colour'"),
        ({"name": "x", "download": {"threads": 3}}, "download: unknown key 'threads'"),
        ({"name": "x", "synthetic": {"n_sample": 3}}, "synthetic: unknown key 'n_sample'"),
        ({"name": "x", "download": {"output_dir": "y"}}, "download: unknown key 'output_dir'"),
        ({"download": {}}, "missing key 'name'"),
        ({"name": "x", "download": [1, 2]}, "download: expected a mapping"),
    ],
)
def test_bad_keys_are_named(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_data_config(_write(tmp_path, data))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_data_config(tmp_path / "nope.yaml")


def test_missing_column_is_named(tmp_path):
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg"], "text": ["a"]}), tmp_path / "list.parquet")
    with pytest.raises(ConfigError, match="no column 'caption' \\(set by caption_col\\); columns: url, text"):
        load_data_config(_write(tmp_path, {"name": "x", "url_list": str(tmp_path / "list.parquet")}))
    config = load_data_config(
        _write(tmp_path, {"name": "x", "url_list": str(tmp_path / "list.parquet"), "download": {"caption_col": "text"}})
    )
    assert read_url_list(config.url_list_path, caption_col="text").num_rows == 1


def test_unsupported_url_list_format_is_named(tmp_path):
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="unsupported format '.json'"):
        read_url_list(tmp_path / "list.json")


def test_shard_that_mixes_splits_is_refused():
    table = pa.table({"split": ["val"] * 3 + ["train"] * 5})
    check_shard_splits(table, 3)
    with pytest.raises(ConfigError, match="shard 0 .* mixes splits"):
        check_shard_splits(table, 4)


def test_overrides_parse_nested_values():
    assert parse_overrides(["download.thread_count=8", "name=x", "synthetic.seed=3"]) == {
        "download": {"thread_count": 8},
        "name": "x",
        "synthetic": {"seed": 3},
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["nonsense"])


def test_cli_prints_the_error_and_exits_2(tmp_path):
    path = _write(tmp_path, {"name": "x", "download": {"bogus": 1}})
    result = subprocess.run(
        [sys.executable, "-m", "pipelines", "download", "--config", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "unknown key 'bogus'" in result.stderr


def test_training_configs_load_and_name_bad_keys(tmp_path):
    from training.clip import load_clip_config
    from training.prior_job import load_prior_config

    for name in ("shapes", "tiny"):
        path = REPO / f"configs/clip/{name}.yaml"
        assert load_clip_config(path)["model"] == yaml.safe_load(path.read_text())["model"]
    for name in ("tiny", "small", "laion-vit-l14"):
        path = REPO / f"configs/prior/{name}.yaml"
        assert load_prior_config(path)["prior"] == yaml.safe_load(path.read_text())["prior"]
    with pytest.raises(ConfigError, match="prior: unknown key 'widht'"):
        load_prior_config(REPO / "configs/prior/small.yaml", ["prior.widht=3"])
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_clip_config(REPO / "configs/clip/shapes.yaml", ["learning_rate=1"])
    with pytest.raises(ConfigError, match="missing key 'model'"):
        load_clip_config(_write(tmp_path, {"data": "x"}))
    from training.decoder_job import load_decoder_config

    with pytest.raises(ConfigError, match="sampling: unknown key 'stepz'"):
        load_decoder_config(REPO / "configs/decoder/small.yaml", ["sampling.stepz=3"])
    with pytest.raises(ConfigError, match="unknown key 'sample_steps'"):
        load_decoder_config(REPO / "configs/decoder/small.yaml", ["sample_steps=3"])
    resolved = load_decoder_config(REPO / "configs/decoder/small.yaml", ["sampling.steps=7"])
    assert (
        resolved["sampling"] == {"guidance_scale": 1.0, "steps": 7} and resolved["lr"] == 1e-3
    )  # the module's default


def test_storage_roots_a_uri_only_where_it_can_be_one():
    from training.prior_job import load_prior_config

    config = load_data_config(REPO / "configs/data/tiny.yaml", ["data_root=s3://bucket/data"])
    assert str(config.layout.embeddings) == "s3://bucket/data/tiny/embeddings"
    with pytest.raises(ConfigError, match="no fsspec file system for nosuch://"):
        load_data_config(REPO / "configs/data/tiny.yaml", ["data_root=nosuch://bucket/data"])
    with pytest.raises(ConfigError, match="outputs_root 'gs://b/o' is a URI"):
        load_prior_config(REPO / "configs/prior/tiny.yaml", ["outputs_root=gs://b/o"])
    with pytest.raises(ConfigError, match="make data renders the synthetic source into a local folder"):
        run_data(config)


def test_a_list_without_splits_gets_val_shards_by_number_stable_as_it_grows():
    from pipelines.download import shard_splits

    splits = shard_splits(25_000, 100, 0.01)  # 250 shards: 0, 100 and 200 are val
    val_shards = sorted({i // 100 for i, s in enumerate(splits) if s == "val"})
    assert val_shards == [0, 100, 200] and splits.count("val") == 300
    assert shard_splits(12_345, 100, 0.01) == splits[:12_345]  # a shorter list: the same splits for its rows
    assert shard_splits(5, 2, 0.01) == ["val", "val", "train", "train", "train"]
    with pytest.raises(ConfigError, match="needs two or more"):
        shard_splits(10, 10, 0.01)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        shard_splits(100, 10, 0.0)


def test_trainers_refuse_shards_without_a_split_and_val_read_from_train(tiny_embed, tmp_path):
    """Without a split a shard would be both trained on and validated against: refused, by tars and
    embeddings alike, as is a validation split that is the training split."""
    import shutil

    from training.data import check_val_split, embedding_shards, tar_shards

    config, _ = tiny_embed
    shards, embeddings = tmp_path / "shards", tmp_path / "embeddings"
    shutil.copytree(config.layout.shards, shards)
    shutil.copytree(config.layout.embeddings, embeddings)
    train, val = tar_shards(shards, "train"), tar_shards(shards, "val")
    assert train and val and not {s.path for s in train} & {s.path for s in val}
    first = sorted(shards.glob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).drop_columns(["split"]), first)
    with pytest.raises(ConfigError, match="has no split"):
        tar_shards(shards, "val")
    first = sorted(embeddings.glob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).drop_columns(["split"]), first)
    with pytest.raises(ConfigError, match="has no split"):
        embedding_shards(embeddings, "train")
    with pytest.raises(ConfigError, match="val_split 'train'"):
        check_val_split("train")


def _jobs():
    from training.clip import CLIP_JOB
    from training.decoder_job import DECODER_JOB, UPSAMPLER_JOB
    from training.prior_job import PRIOR_JOB

    return {"clip": CLIP_JOB, "prior": PRIOR_JOB, "decoder": DECODER_JOB, "upsampler": UPSAMPLER_JOB}


def _job_of(path) -> str:
    return "upsampler" if path.name.startswith("upsampler") else path.parent.name


def test_a_key_with_two_defaults_is_refused():
    from training.settings import JobSpec

    def module(lr: float = 1e-3, seed: int = 0): ...

    def data(batch_size: int = 8, seed: int = 0): ...

    with pytest.raises(TypeError, match="'seed' has a default in both module and data"):
        JobSpec({"module": module, "data": data})
    spec = JobSpec({"module": module, "data": lambda batch_size=8, *, seed: None})
    assert spec.split({"lr": 0.5}) == {"module": {"lr": 0.5, "seed": 0}, "data": {"batch_size": 8, "seed": 0}}


TRAINING_CONFIGS = sorted(p for job in ("clip", "prior", "decoder") for p in (REPO / "configs" / job).glob("*.yaml"))


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_training_configs_hold_only_what_differs_from_the_defaults(path):
    """Each training config loads, and no key (nor any key of its sampling section) repeats its one default.
    The network sizes are exempt: a named size spells out its shape (STYLE.md 7); so is `precision`, which every
    config states (the numerics a run trains in, at a glance)."""
    from dataclasses import MISSING, fields

    spec = _jobs()[_job_of(path)]
    raw = parse_yaml(path.read_text())  # as the jobs read it
    spec.load(path)
    assert "precision" in raw
    repeated = [k for k, v in raw.items() if k in spec.defaults and spec.defaults[k] == v and k != "precision"]
    for name, kind in spec.sections.items():
        if name == "sampling" and isinstance(raw.get(name), dict):
            defaults = {f.name: f.default for f in fields(kind) if f.default is not MISSING}
            defaults.update({f.name: f.default_factory() for f in fields(kind) if f.default_factory is not MISSING})
            repeated += [f"{name}.{k}" for k, v in raw[name].items() if k in defaults and defaults[k] == v]
    assert repeated == []


def test_exponent_numbers_without_a_dot_are_floats_in_configs_and_overrides(tmp_path):
    """`lr: 1e-3` and `--set lr=1e-3` give the float 0.001 (PyYAML alone reads them as strings, YAML 1.1), while
    other scalars parse as YAML always did."""
    import datetime

    from embeddings.config import dump_yaml, load_yaml

    assert parse_overrides(["lr=1e-3", "decay=5E+2", "steps=600", "name=1e3x", "cap=-2.5e-1", "v=1.0e-3"]) == {
        "lr": 0.001,
        "decay": 500.0,
        "steps": 600,
        "name": "1e3x",
        "cap": -0.25,
        "v": 0.001,
    }
    assert parse_overrides(["a=.inf", "b=1_000", "c=0x1e3", "d=1.2.3", "e=1.0e3", "f=2026-11-30"]) == {
        "a": float("inf"),
        "b": 1000,
        "c": 0x1E3,
        "d": "1.2.3",
        "e": 1000.0,
        "f": datetime.date(2026, 11, 30),
    }
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-4\nseed: 7\nname: e5\n")
    loaded = load_yaml(path)
    assert loaded == {"lr": 0.0005, "seed": 7, "name": "e5"} and isinstance(loaded["lr"], float)
    # what the jobs write (data/<name>/data.yaml) reads back the same: a string that looks like a number stays one
    values = {"name": "1e5", "lr": 1e-3, "steps": 600}
    assert "'1e5'" in dump_yaml(values) and parse_yaml(dump_yaml(values)) == values
