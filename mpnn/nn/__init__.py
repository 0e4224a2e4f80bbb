"""Building blocks shared by the models."""

from mpnn.nn.radial import bessel_basis, masked_edge_vectors, polynomial_envelope, radial_features, safe_norm
from mpnn.nn.blocks import (
    MessagePassing,
    NodeOutputs,
    ScalarReadout,
    SpeciesLinear,
    edge_geometry,
    relative_to_isolated,
    shifted_softplus,
    species_embedding,
)
from mpnn.nn.symmetric_contraction import SymmetricContraction

__all__ = [
    "bessel_basis",
    "polynomial_envelope",
    "radial_features",
    "masked_edge_vectors",
    "safe_norm",
    "MessagePassing",
    "ScalarReadout",
    "NodeOutputs",
    "SpeciesLinear",
    "SymmetricContraction",
    "edge_geometry",
    "species_embedding",
    "relative_to_isolated",
    "shifted_softplus",
]
