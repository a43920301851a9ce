"""The parameter server behind ``mode="async"``: layout, optimizer recipes, shard actors.

``synctrain.strategies.paramserver`` is the strategy that uses these parts; its module
docstring holds the theory of operation.
"""

from synctrain.ps.errors import (
    GradientShapeError,
    NonFiniteGradientError,
    ParameterServerError,
    StaleJobError,
    StalenessTimeoutError,
    UnsupportedOptimizerError,
)
from synctrain.ps.layout import FlatLayout
from synctrain.ps.recipe import OptimizerRecipe

__all__ = [
    "FlatLayout",
    "OptimizerRecipe",
    "ParameterServerError",
    "StaleJobError",
    "StalenessTimeoutError",
    "NonFiniteGradientError",
    "GradientShapeError",
    "UnsupportedOptimizerError",
]
