"""liquid-fed: federated learning with a Liquid Ensemble."""

from liquid_fed.ensemble import EnsembleOutput, LiquidConfig, LiquidEnsemble, combine
from liquid_fed.experts import (
    EXPERTS,
    CNNExpert,
    ESNExpert,
    LTCExpert,
    MLPExpert,
    build_expert,
)
from liquid_fed.solvers import SOLVERS, solve_power

__all__ = [
    "EXPERTS", "SOLVERS", "CNNExpert", "ESNExpert", "EnsembleOutput", "LTCExpert",
    "LiquidConfig", "LiquidEnsemble", "MLPExpert",
    "build_expert", "combine", "solve_power",
]
