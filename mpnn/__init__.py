"""mpnn: E(3)-equivariant message-passing interatomic potentials in JAX.

    import mpnn
    mpnn.keep_freed_memory()                           # CPU: reuse temporaries' memory (first)
    potential = mpnn.load("runs/default/model")       # predict energy/forces/stress
    atoms.calc = mpnn.MPNNCalculator("runs/default/model")
    fresh = mpnn.build_potential({"name": "mace", "num_features": 32}, numbers=[1, 6, 8])
"""

from mpnn.calculators.ase import MPNNCalculator
from mpnn.config import Config, load_config, model_config
from mpnn.host_memory import keep_freed_memory
from mpnn.potential import Potential, PrecisionError, build_potential, enable_x64
from mpnn.saved_model import ModelFileError, load_model, save_model

load = load_model

__all__ = [
    "Config",
    "MPNNCalculator",
    "ModelFileError",
    "Potential",
    "PrecisionError",
    "build_potential",
    "enable_x64",
    "keep_freed_memory",
    "load",
    "load_config",
    "load_model",
    "model_config",
    "save_model",
]
__version__ = "0.1.0"
