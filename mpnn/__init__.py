"""mpnn: E(3)-equivariant message-passing interatomic potentials in JAX.

    import mpnn
    potential = mpnn.load("runs/default/model")       # predict energy/forces/stress
    atoms.calc = mpnn.MPNNCalculator("runs/default/model")
"""

from mpnn.calculators.ase import MPNNCalculator
from mpnn.config import Config, load_config
from mpnn.potential import Potential
from mpnn.saved_model import ModelFileError, load_model, save_model

load = load_model

__all__ = ["Config", "MPNNCalculator", "ModelFileError", "Potential", "load", "load_config", "load_model", "save_model"]
__version__ = "0.1.0"
