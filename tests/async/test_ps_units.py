"""Pure parts of the parameter server: flat layout, shard cuts, optimizer recipes, options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import synctrain
from synctrain import ConfigError
from synctrain.ps import FlatLayout, OptimizerRecipe, UnsupportedOptimizerError
from synctrain.ps.layout import Segment


def loop(config):
    return None


def test_shards_are_balanced_by_bytes_and_cover_everything():
    layout = FlatLayout.of(nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 3)))
    assert layout.total == 10 * 7 + 7 + 7 * 3 + 3
    for k in (1, 2, 3, 4, 7):
        bounds = layout.shard_bounds(k)
        assert bounds[0][0] == 0 and bounds[-1][1] == layout.total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_more_shards_than_parameter_elements_is_a_clear_error():
    layout = FlatLayout.of(nn.Linear(1, 1))  # 2 elements
    with pytest.raises(ValueError, match=r"num_ps_shards=3 is larger than the model's 2 parameter elements"):
        layout.shard_bounds(3)


def test_segments_cut_parameters_at_shard_edges_and_keep_their_group():
    layout = FlatLayout.of(nn.Linear(3, 2))  # weight: 6 elements, bias: 2
    assert layout.segments(4, 8, (0, 1)) == (Segment(0, 2, 0), Segment(2, 4, 1))
    assert layout.segments(0, 4, (None, 1)) == (Segment(0, 4, None),)


def test_mixed_dtypes_are_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="one dtype"):
        FlatLayout.of(model)


def test_recipe_keeps_class_and_param_group_settings():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}],
                          lr=0.3, momentum=0.9, nesterov=True)
    recipe = OptimizerRecipe.of(opt, params)
    assert recipe.kind == "SGD" and recipe.group_of == (0, 0, 1, 1)
    g0, g1 = dict(recipe.groups[0]), dict(recipe.groups[1])
    assert (g0["weight_decay"], g1["weight_decay"], g0["momentum"], g1["nesterov"]) == (0.1, 0, 0.9, True)
    rebuilt = recipe.build({0: [torch.zeros(3)], 1: [torch.zeros(2)]})
    assert isinstance(rebuilt, torch.optim.SGD) and rebuilt.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_family_is_supported(cls):
    p = nn.Parameter(torch.zeros(3))
    recipe = OptimizerRecipe.of(cls([p], lr=0.01, betas=(0.8, 0.9)), [p])
    assert recipe.kind == cls.__name__ and dict(recipe.groups[0])["betas"] == (0.8, 0.9)


def test_unsupported_optimizer_names_the_supported_ones():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(UnsupportedOptimizerError, match=r"torch\.optim\.SGD, torch\.optim\.Adam, torch\.optim\.AdamW.*RMSprop"):
        OptimizerRecipe.of(torch.optim.RMSprop([p]), [p])


def test_async_options_are_validated_before_anything_starts():
    with pytest.raises(ConfigError, match=r"\['grad_accum_steps'\] only apply to mode='sync'"):
        synctrain.Trainer(loop, mode="async", grad_accum_steps=2)
    with pytest.raises(ConfigError, match="staleness must be None"):
        synctrain.Trainer(loop, mode="async", staleness=-1)
    with pytest.raises(ConfigError, match="num_ps_shards must be"):
        synctrain.Trainer(loop, mode="async", num_ps_shards=0)
    with pytest.raises(ConfigError, match="does not take"):
        synctrain.Trainer(loop, mode="async", warp=1)
    with pytest.raises(ConfigError, match=r"transport must be one of \['auto', 'ray'\]"):
        synctrain.Trainer(loop, mode="async", transport="tcp")
    t = synctrain.Trainer(loop, mode="async", staleness=3, num_ps_shards=2)
    assert t.strategy_options["staleness"] == 3 and t.strategy_options["update_rule"] == "mean"
    assert t.strategy_options["transport"] == "auto"


def test_inline_pieces_only_for_ranges_between_the_inline_limit_and_the_chunked_maximum():
    from synctrain.strategies.paramserver import (
        CHUNKED_MAX_BYTES,
        INLINE_BYTES,
        INLINE_PIECE_BYTES,
        _inline_pieces,
    )

    assert _inline_pieces(INLINE_BYTES - 1) == 1  # inline already, whole
    assert _inline_pieces(CHUNKED_MAX_BYTES + 1) == 1  # big: the object store wins
    for nbytes in (INLINE_BYTES, 150_000, 200_000, CHUNKED_MAX_BYTES):
        pieces = _inline_pieces(nbytes)
        assert pieces >= 2
        assert -(-nbytes // pieces) <= INLINE_PIECE_BYTES < INLINE_BYTES  # each piece travels inline
