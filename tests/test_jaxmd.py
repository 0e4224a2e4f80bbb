"""The jax-md path: energies, forces, stress and per-atom virials equal the ASE calculator's
(float64, tight tolerances) for a molecule, a small triclinic cell (multi-image neighbor
list) and a larger one (jax-md's minimum-image list); neighbor-list overflow and boxes
that outgrow their list are detected; it runs inside jit + lax.fori_loop with jax-md's
integrators. A tiny random-weight model: these are consistency checks, valid for any weights.
"""

from __future__ import annotations

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from ase.stress import full_3x3_to_voigt_6_stress

pytest.importorskip("jax_md")
from jax_md import simulate, space  # noqa: E402

import mpnn.jaxmd as J  # noqa: E402
from mpnn.calculators.ase import MPNNCalculator  # noqa: E402
from mpnn.potential import CountedJit  # noqa: E402
from tests.conftest import random_potential  # noqa: E402

NUMBERS = [1, 6, 8, 29]
E0 = [-13.6, -1030.0, -2040.0, -3.5]
CUTOFF = 3.5  # tiny_model_config


@pytest.fixture(scope="module")
def potential():
    # With ZBL on: the pair term must reach jax-md through the same energy definition.
    return random_potential(NUMBERS, E0, scale=0.7, seed=1, pair_repulsion="zbl")


def sheared_cu(repeat: int, seed: int) -> ase.Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.05, 0.0], [0.0, 1.0, -0.03], [0.02, 0.0, 1.0]]), scale_atoms=True)
    atoms = atoms.repeat(repeat)
    atoms.rattle(0.1, seed=seed)
    # Rotate so the cell is not in ASE's standard form: system_from_atoms must undo it.
    atoms.rotate(23, (1, 2, 3), rotate_cell=True)
    return atoms


def ethanol() -> ase.Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=0)
    return atoms


STRUCTURES = {  # name: (structure, fractional coordinates?)
    "cu32_min_image": (lambda: sheared_cu(2, seed=1), True),  # widths ≈ 7.1 Å ≥ 2 × 3.5: jax-md's own list
    "cu4_multi_image": (lambda: sheared_cu(1, seed=0), False),  # widths ≈ 3.6 Å: several images per pair
    "ethanol_free": (ethanol, False),
}


@pytest.fixture(scope="module")
def reference(potential):
    """ASE calculator results; one calculator, largest structure first, so one compilation."""
    calc = MPNNCalculator(potential)
    out = {}
    for name, (build, _) in STRUCTURES.items():
        atoms = build()
        atoms.calc = calc
        out[name] = {
            "atoms": atoms,
            "energy": atoms.get_potential_energy(),
            "forces": atoms.get_forces(),
            "stress": atoms.get_stress() if atoms.pbc.all() else None,
            "virials": calc.results.get("virials"),
        }
    return out


class Setup:
    """System, neighbor list and one jitted function computing everything for one structure."""

    def __init__(self, potential, atoms, fractional):
        self.system = J.system_from_atoms(atoms, fractional_coordinates=fractional)
        s = self.system
        self.periodic = s.box is not None
        self.nbr_fns = J.neighbor_list(potential, s.displacement_fn, s.box, fractional_coordinates=s.fractional)
        self.nbrs = self.nbr_fns.allocate(s.positions)
        self.energy = J.energy_fn(potential, s.displacement_fn, s.numbers)
        props = J.properties_fn(potential, s.displacement_fn, s.numbers, s.box)
        energy = self.energy

        def compute(R, nbrs):
            # jax-md's route (npt_nose_hoover's force_stress_fn): one backward pass through
            # the displacement function gives forces and the strain derivative.
            def U(R, eps):
                return energy(R, neighbor=nbrs, perturbation=jnp.eye(3) + eps)

            e, (gR, gEps) = jax.value_and_grad(U, argnums=(0, 1))(R, jnp.zeros((3, 3)))
            out = {"energy": e, "forces": -gR, "dU_deps": gEps}
            if self.periodic:
                # energy_and_derivatives over the same edges: per-atom virials, stress.
                out["props"] = props(R, neighbor=nbrs)
            else:
                out["energy_all_pairs"] = energy(R, neighbor=None)
            return out

        self.compute = jax.jit(compute)
        self.energy_jit = jax.jit(lambda R, nbrs: energy(R, neighbor=nbrs))

    def to_original(self, tensor):
        Q = self.system.rotation
        return Q.T @ np.asarray(tensor) @ Q


@pytest.fixture(scope="module")
def setups(potential):
    return {}


def get_setup(setups, potential, reference, name) -> Setup:
    if name not in setups:
        setups[name] = Setup(potential, reference[name]["atoms"], STRUCTURES[name][1])
    return setups[name]


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_matches_ase_calculator(potential, reference, setups, name):
    ref = reference[name]
    setup = get_setup(setups, potential, reference, name)
    out = jax.device_get(setup.compute(setup.system.positions, setup.nbrs))
    n = len(ref["atoms"])
    scale_f = np.abs(ref["forces"]).max()

    # Padding is present (capacity 1.25 × pairs) and changes nothing.
    assert np.sum(np.asarray(setup.nbrs.idx[0]) == n) > 0
    expected_type = {"cu32_min_image": "NeighborList", "cu4_multi_image": "NeighborListMultiImage", "ethanol_free": "NeighborList"}
    assert type(setup.nbrs).__name__ == expected_type[name]

    assert abs(out["energy"] - ref["energy"]) <= 1e-10 * abs(ref["energy"])
    assert np.abs(setup.system.to_original_frame(out["forces"]) - ref["forces"]).max() <= 1e-10 * scale_f
    if not setup.periodic:
        assert abs(out["energy_all_pairs"] - ref["energy"]) <= 1e-10 * abs(ref["energy"])
        return
    volume = ref["atoms"].get_volume()
    props = out["props"]
    assert abs(props["energy"] - ref["energy"]) <= 1e-10 * abs(ref["energy"])
    assert np.abs(props["energies"].sum() - ref["energy"]) <= 1e-10 * abs(ref["energy"])
    assert np.abs(setup.system.to_original_frame(props["forces"]) - ref["forces"]).max() <= 1e-10 * scale_f
    for stress in (props["stress"], out["dU_deps"] / volume):
        voigt = full_3x3_to_voigt_6_stress(setup.to_original(stress))
        assert np.abs(voigt - ref["stress"]).max() <= 1e-10 * np.abs(ref["stress"]).max()
    # Per-atom virials: sum to the total virial, and equal the ASE calculator's.
    virials, virial = props["virials"], props["virial"]
    assert np.abs(virials.sum(0) - virial).max() <= 1e-12 * np.abs(virial).max()
    per_atom = np.einsum("ij,njk,kl->nil", setup.system.rotation.T, virials, setup.system.rotation)
    assert np.abs(per_atom - ref["virials"]).max() <= 1e-10 * np.abs(ref["virials"]).max()


@pytest.mark.parametrize("name", ["cu4_multi_image", "cu32_min_image"])
def test_atoms_wrapping_between_rebuilds_keep_their_images(potential, reference, setups, name):
    """shift_fn wraps positions into the box; a list built before the wrap must still work."""
    setup = get_setup(setups, potential, reference, name)
    T = np.asarray(setup.system.box)
    to_frac = (lambda R: np.array(R)) if setup.system.fractional else (lambda R: np.linalg.solve(T, np.asarray(R).T).T)
    frac = to_frac(setup.system.positions)
    frac[0] = [0.9995, 0.0004, 0.0003]  # atom 0 sits at the origin's lattice site
    R = jnp.asarray(frac if setup.system.fractional else frac @ T.T)
    nbrs = setup.nbrs.update(R)
    # Move atom 0 by +0.001 and atom 1 a little: atom 0 crosses two faces and is wrapped.
    dR = jnp.zeros_like(R).at[0].set(T @ np.array([0.001, -0.001, 0.0])).at[1, 2].set(0.01)
    moved = setup.system.shift_fn(R, dR)
    assert to_frac(moved)[0, 0] < 0.01 and to_frac(moved)[0, 1] > 0.99  # wrapped
    stale = setup.energy_jit(moved, nbrs)
    fresh = setup.energy_jit(moved, setup.nbrs.update(moved))
    assert abs(float(stale) - float(fresh)) <= 1e-10 * abs(float(fresh))


def test_overflow_and_box_changes_are_detected(potential):
    """Too many pairs for the capacity, or a box that shrinks past what the list can describe."""
    atoms = bulk("Cu", "fcc", a=3.9, cubic=True).repeat(2)  # 12 neighbors within 3.5 Å
    system = J.system_from_atoms(atoms)  # real coordinates
    fns = J.neighbor_list(potential, system.displacement_fn, system.box)
    nbrs = fns.allocate(system.positions)
    assert not J.needs_reallocation(nbrs)
    update = jax.jit(lambda R, nbrs, box: nbrs.update(R, box=box))
    # Same positions in a box compressed by 15% (as NPT would pass it): 18 neighbors each, and the box
    # (6.6 Å wide) is now too small for minimum image with a 3.5 Å cutoff.
    compressed = update(0.85 * system.positions, nbrs, 0.85 * system.box)
    assert J.needs_reallocation(compressed)
    assert not J.needs_reallocation(update(system.positions, nbrs, system.box))
    # Reallocating for the new box switches to a multi-image list, which then fits.
    again = fns.allocate(0.85 * system.positions, box=0.85 * system.box)
    assert type(again).__name__ == "NeighborListMultiImage" and not J.needs_reallocation(again)
    # A multi-image list flags a box that needs more images than it searched.
    squeezed = update(0.5 * system.positions, again, 0.5 * system.box)
    assert J.needs_reallocation(squeezed)
    # ... and keeps the flag through later updates that fit again (a check after a loop of steps sees it).
    assert J.needs_reallocation(update(0.85 * system.positions, squeezed, 0.85 * system.box))
    # Pure capacity overflow, box unchanged: allocate dilated, update compressed positions.
    real_fns = J.neighbor_list(potential, space.free()[0], None)
    nbrs = real_fns.allocate(jnp.asarray(atoms.positions * 1.2))
    assert J.needs_reallocation(nbrs.update(jnp.asarray(atoms.positions * 0.8)))


def test_clear_errors(potential):
    small = bulk("Cu", "fcc", a=3.61, cubic=True)
    system = J.system_from_atoms(small)
    with pytest.raises(ValueError, match="minimum-image"):
        J.neighbor_list(potential, system.displacement_fn, system.box, multi_image=False).allocate(system.positions)
    with pytest.raises(ValueError, match="upper triangular"):
        J.neighbor_list(potential, system.displacement_fn, system.box.T + 0.1 * jnp.eye(3)[::-1], fractional_coordinates=True)
    slab = fcc111("Cu", (2, 2, 3), a=3.61, vacuum=4.0)
    slab.pbc = (True, True, False)
    with pytest.raises(ValueError, match="free or periodic"):
        J.system_from_atoms(slab)
    with pytest.raises(ValueError, match="not known"):
        J.energy_fn(potential, system.displacement_fn, [79] * len(small))


def test_nvt_nose_hoover_inside_fori_loop():
    """The plain jax-md recipe: jit + lax.fori_loop, neighbor list updated every step.

    Without ZBL: random weights do not cancel ZBL at bonded distances, so with it the
    molecule flies apart (forces ~6 eV/Å) and the invariant's error, though it converges
    with the timestep, is not a clean check."""
    potential = random_potential(NUMBERS, E0, scale=0.7, seed=1)
    atoms = ethanol()
    system = J.system_from_atoms(atoms)
    fns = J.neighbor_list(potential, system.displacement_fn, None)
    energy = J.energy_fn(potential, system.displacement_fn, system.numbers)
    nbrs = fns.allocate(system.positions)
    kT = 300 * ase.units.kB
    init_fn, apply_fn = simulate.nvt_nose_hoover(energy, system.shift_fn, 0.5 * ase.units.fs, kT)
    state = init_fn(jax.random.PRNGKey(0), system.positions, mass=jnp.asarray(system.masses), neighbor=nbrs)
    def run(state, nbrs):
        def body(i, carry):
            state, nbrs = carry
            nbrs = nbrs.update(state.position)
            return apply_fn(state, neighbor=nbrs), nbrs

        start = simulate.nvt_nose_hoover_invariant(energy, state, kT, neighbor=nbrs)
        state, nbrs = jax.lax.fori_loop(0, 20, body, (state, nbrs))
        return state, nbrs, start, simulate.nvt_nose_hoover_invariant(energy, state, kT, neighbor=nbrs)

    run = CountedJit(run)
    state, nbrs, invariant0, _ = run(state, nbrs)
    state, nbrs, _, invariant = run(state, nbrs)  # second call: cached, no new trace
    assert not J.needs_reallocation(nbrs)
    assert np.all(np.isfinite(np.asarray(state.position)))
    # Nose-Hoover's extended energy is conserved (0.5 fs steps, 40 steps, float64).
    assert abs(float(invariant) - float(invariant0)) < 1e-3
    assert run.n_compiles == 1
