"""Every config is checked when loaded: each kind of mistake is an error that names it."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from embeddings.config import ConfigError, parse_overrides
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
        assert load_clip_config(REPO / f"configs/clip/{name}.yaml")["model"]["embed_dim"] > 0
    for name in ("tiny", "small", "laion-vit-l14"):
        assert load_prior_config(REPO / f"configs/prior/{name}.yaml")["prior"]["width"] > 0
    with pytest.raises(ConfigError, match="prior: unknown key 'widht'"):
        load_prior_config(REPO / "configs/prior/small.yaml", ["prior.widht=3"])
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_clip_config(REPO / "configs/clip/shapes.yaml", ["learning_rate=1"])
    with pytest.raises(ConfigError, match="missing key 'model'"):
        load_clip_config(_write(tmp_path, {"data": "x"}))


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
