"""dtype names and quantization modes: one list each (``models.dtypes``, ``models.quantize``), every other
list (the store format, precompute's config, the CLI's choices, ``Frozen``, ``ReferenceConfig``) derived."""

from __future__ import annotations

import click
import pytest
import torch

from refmodel.cli.main import main
from refmodel.errors import ConfigError
from refmodel.models.dtypes import DTYPE_NAMES, FLOAT_DTYPES, parse_dtype
from refmodel.models.quantize import QUANT_MODES
from refmodel.precompute.config import MODEL_DTYPES, PrecomputeConfig
from refmodel.reference import ReferenceConfig
from refmodel.store.format import DTYPES, normalize_dtype


def _option(command: click.Command, name: str) -> click.Option:
    return next(p for p in command.params if isinstance(p, click.Option) and name in p.opts)


def test_dtype_lists_derive_from_one():
    assert tuple(DTYPES) == DTYPE_NAMES and tuple(FLOAT_DTYPES) == (*DTYPE_NAMES, "float64")
    assert MODEL_DTYPES == ("auto", *DTYPE_NAMES)
    assert tuple(_option(main.commands["precompute"], "--dtype").type.choices) == DTYPE_NAMES
    assert tuple(_option(main.commands["precompute"], "--model-dtype").type.choices) == MODEL_DTYPES
    for name in DTYPE_NAMES:
        assert parse_dtype(name) == getattr(torch, name) and normalize_dtype(name) == name
        assert PrecomputeConfig(dtype=name, model_dtype=name).model_kwargs() == {"dtype": getattr(torch, name)}


def test_quantization_modes_derive_from_one():
    assert _option(main.commands["quantize-report"], "--modes").default == ",".join(QUANT_MODES)
    for mode in QUANT_MODES:
        assert ReferenceConfig(quantize=mode).quantize == mode
    with pytest.raises(ConfigError, match=r"unknown quantization mode 'int3'; expected one of"):
        ReferenceConfig(quantize="int3")
