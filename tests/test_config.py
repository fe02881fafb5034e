"""PruningConfig from the command line (HfArgumentParser, as the README claims) and its type / value checks."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from transformers import HfArgumentParser

from hfprune.config import PruningConfig


def _parse(argv):
    (config,) = HfArgumentParser(PruningConfig).parse_args_into_dataclasses(argv, look_for_args_file=False)
    return config


def test_defaults_from_an_empty_command_line_equal_the_python_defaults():
    assert _parse([]) == PruningConfig()
    assert PruningConfig().structures == ("heads", "channels")


def test_command_line_flags_fill_every_kind_of_field():
    config = _parse([
        "--target_sparsity", "0.35", "--importance", "taylor", "--structures", "heads", "channels",
        "--head_granularity", "query_head", "--pruning_steps", "40", "--head_sparsity", "0.25",
        "--protected_layers", "0", "-1", "--uniform", "--schedule", "linear", "--seed", "7",
    ])
    assert config.target_sparsity == 0.35 and config.importance == "taylor"
    assert config.structures == ("heads", "channels")  # a tuple, as from Python
    assert config.head_granularity == "query_head" and config.schedule == "linear"
    assert config.pruning_steps == 40 and isinstance(config.pruning_steps, int)  # Optional[int]
    assert config.head_sparsity == 0.25  # Optional[float]
    assert config.protected_layers == (0, -1) and config.uniform is True and config.seed == 7
    assert _parse(["--structures", "channels"]).structures == ("channels",)
    assert _parse(["--uniform", "false"]).uniform is False
    assert _parse([]).pruning_steps is None and _parse([]).protected_layers is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--structures", "layers"], "invalid choice: 'layers'"),
        (["--schedule", "exp"], "invalid choice: 'exp'"),
        (["--pruning_steps", "1.5"], "invalid int value: '1.5'"),
        (["--protected_layers", "0.7"], "invalid int value: '0.7'"),
        (["--uniform", "maybe"], "Truthy value expected: got maybe"),
    ],
)
def test_bad_command_line_values_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert message in capsys.readouterr().err


def test_yaml_and_json_files(tmp_path):
    settings = {"target_sparsity": 0.5, "structures": ["channels"], "protected_layers": [0, 1],
                "channel_sparsity": 0.5, "ranking": "local", "pruning_steps": 20}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "p.json").write_text(json.dumps(settings))
    parser = HfArgumentParser(PruningConfig)
    (from_yaml,) = parser.parse_yaml_file(tmp_path / "p.yaml")
    (from_json,) = parser.parse_json_file(tmp_path / "p.json")
    assert from_yaml == from_json == PruningConfig(**settings)
    assert from_yaml.structures == ("channels",) and from_yaml.protected_layers == (0, 1)
    (tmp_path / "bad.yaml").write_text("target_sparsity: 0.5\ntarget_sparsty: 0.4\n")
    with pytest.raises(ValueError, match="target_sparsty"):
        parser.parse_yaml_file(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(uniform="no"), TypeError, "uniform='no': must be True or False"),
        (dict(uniform=1), TypeError, "uniform=1: must be True or False"),
        (dict(protected_layers=[0.7]), TypeError, r"protected_layers=\[0.7\]: 0.7 is not an integer"),
        (dict(protected_layers=[True]), TypeError, r"protected_layers=\[True\]: True is not an integer"),
        (dict(protected_layers="0,1"), TypeError, r"protected_layers='0,1': must be a list of integers, e.g. \[0, 1\]"),
        (dict(protected_layers=5), TypeError, r"protected_layers=5: must be a list of integers"),
        (dict(target_sparsity=math.nan), ValueError, r"target_sparsity=nan: must be in \[0, 1\)"),
        (dict(target_sparsity="0.2"), TypeError, r"target_sparsity='0.2': must be a number in \[0, 1\)"),
        (dict(head_sparsity=math.inf), ValueError, r"head_sparsity=inf: must be in \[0, 1\)"),
        (dict(ema_decay=math.nan), ValueError, r"ema_decay=nan: must be in \[0, 1\)"),
        (dict(seed="abc"), TypeError, "seed='abc': must be an integer"),
        (dict(seed=1.5), TypeError, "seed=1.5: must be an integer"),
        (dict(prune_every=True), TypeError, "prune_every=True: must be an integer >= 1"),
        (dict(pruning_steps=0), ValueError, "pruning_steps=0: must be an integer >= 1 or None"),
        (dict(structures="layers"), ValueError, r"structures=\('layers',\): must be a non-empty subset"),
        (dict(structures=[1]), TypeError, r"structures=\[1\]: must be a list of strings"),
        (dict(ranking="globl"), ValueError, "ranking='globl': must be one of local, global"),
    ],
)
def test_bad_values_name_the_value_and_what_is_valid(kwargs, error, message):
    with pytest.raises(error, match=message):
        PruningConfig(**kwargs)


def test_good_values_are_normalised():
    import numpy as np

    config = PruningConfig(structures="channels", protected_layers=[0, -1], target_sparsity=0)
    assert config.structures == ("channels",) and config.protected_layers == (0, -1)
    assert PruningConfig(protected_layers=()).protected_layers == ()
    config = PruningConfig(protected_layers=np.arange(2), target_sparsity=np.float32(0.5), seed=np.int64(3))
    assert config.protected_layers == (0, 1) and all(type(i) is int for i in config.protected_layers)
    with pytest.raises(TypeError, match="protected_layers=np.int64\\(5\\): must be a list of integers"):
        PruningConfig(protected_layers=np.int64(5))
