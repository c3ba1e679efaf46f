from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from onnxzip.errors import ConfigError
from onnxzip.core.schema import build_config, option, parse_flag_value


@dataclass
class Cfg:
    k: int | Literal["auto"] = option(16, "clusters")
    energy: float | None = option(None, "energy kept")
    include: list[str] = option([], "patterns")
    per_channel: bool = option(False, "per channel")


def test_one_schema_for_flags_and_mappings():
    from_flag = build_config(Cfg, parse_flag_value("auto,energy=0.9,include=fc*|attn*", shorthand="k", owner="--x"), owner="x")
    from_map = build_config(Cfg, {"k": "auto", "energy": 0.9, "include": ["fc*", "attn*"]}, owner="x")
    assert from_flag == from_map == Cfg("auto", 0.9, ["fc*", "attn*"], False)
    assert build_config(Cfg, {"k": "8", "per-channel": "yes"}, owner="x") == Cfg(8, None, [], True)


@pytest.mark.parametrize(
    "values, message",
    [({"k": "many"}, "k must be"), ({"k": 2.5}, "k must be"), ({"kk": 1}, "no option kk; its options are k, energy"),
     ({"energy": "high"}, "energy must be")],
)
def test_errors_name_the_option(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(Cfg, values, owner="pass 'x'")


def test_flag_syntax_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_flag_value("a,b", shorthand=None, owner="--x")


def test_mapping_options_are_written_key_value_pairs_on_the_command_line():
    from onnxzip.errors import ConfigError
    from onnxzip.passes import get_pass
    from onnxzip.core.schema import parse_flag_value

    cls = get_pass("prune-channels")
    values = parse_flag_value("layer_ratios=/blocks/blocks.0/*:0.5|/stem/*:0.25", shorthand=cls.shorthand, owner="--prune-channels")
    assert cls(values).config.layer_ratios == {"/blocks/blocks.0/*": 0.5, "/stem/*": 0.25}
    with pytest.raises(ConfigError, match="KEY:VALUE pairs"):
        cls({"layer_ratios": "0.5"})
    with pytest.raises(ConfigError, match="must be a number"):
        cls({"layer_ratios": "conv:half"})
