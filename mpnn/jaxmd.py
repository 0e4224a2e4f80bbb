"""`mpnn.jaxmd`: a trained potential in jax-md (see `mpnn.calculators.jaxmd` for the details).

    import mpnn, mpnn.jaxmd
    system = mpnn.jaxmd.system_from_atoms(atoms)
    energy = mpnn.jaxmd.energy_fn(potential, system.displacement_fn, system.numbers)
    neighbor_fns = mpnn.jaxmd.neighbor_list(potential, system.displacement_fn, system.box,
                                            fractional_coordinates=system.fractional)
"""

from mpnn.calculators.jaxmd import (  # noqa: F401
    JaxMDSystem,
    box_matrix,
    energy_fn,
    min_image_is_exact,
    needs_reallocation,
    neighbor_list,
    overflowed,
    perpendicular_widths,
    properties_fn,
    species_indices,
    system_from_atoms,
)
from mpnn.calculators.jaxmd import __all__  # noqa: F401
