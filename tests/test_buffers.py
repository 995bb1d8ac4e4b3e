"""Buffers not in the checkpoint are computed by the model's own `_init_weights`, never left
as `to_empty` memory; one it cannot compute is an error naming it."""

from __future__ import annotations

import copy

import pytest
import torch

from streamq.checkpoint.reader import CheckpointReader
from streamq.errors import CheckpointError
from streamq.model.ignore import IgnoreMatcher
from streamq.model.layer import materialize_layer
from streamq.model.layout import plan_layer
from streamq.model.skeleton import build_skeleton, load_model_config
from streamq.testing.arch_matrix import build_arch_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = build_arch_model("llama", tmp_path_factory.mktemp("buffers") / "llama", with_tokenizer=False)
    reader = CheckpointReader(path)
    return reader, load_model_config(path)


def _layer0(reader, config, extra):
    skeleton = build_skeleton(config, torch.bfloat16)
    layer = skeleton.model.layers[0]
    extra(skeleton, layer)
    layout = plan_layer(layer, 0, "model.layers", reader.layers[0], IgnoreMatcher(()))
    return skeleton, layer, layout


def test_rotary_table_inside_a_layer_is_computed(llama):
    reader, config = llama
    skeleton, layer, layout = _layer0(reader, config, lambda s, lay: setattr(
        lay.self_attn, "rope", copy.deepcopy(s.model.rotary_emb)))
    materialize_layer(layer, layout, reader.read(reader.layers[0]), torch.device("cpu"), skeleton)
    expected, _ = type(skeleton.model.rotary_emb).compute_default_rope_parameters(config)
    assert torch.equal(layer.self_attn.rope.inv_freq, expected)
    assert torch.equal(layer.self_attn.rope.original_inv_freq, expected)


def test_buffer_no_code_computes_is_an_error(llama):
    reader, config = llama

    def add(_s, lay):
        with torch.device("meta"):
            lay.mlp.register_buffer("mystery", torch.empty(4), persistent=False)

    skeleton, layer, layout = _layer0(reader, config, add)
    with pytest.raises(CheckpointError, match=r"buffer 'model\.layers\.0\.mlp\.mystery'.*_init_weights"):
        materialize_layer(layer, layout, reader.read(reader.layers[0]), torch.device("cpu"), skeleton)
