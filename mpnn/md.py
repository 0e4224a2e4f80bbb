"""Molecular dynamics with a trained potential through jax-md.

    python -m mpnn.md --model RUN/model --structure POSCAR_or.xyz --ensemble nvt \\
        --temperature 600 --timestep 2 --steps 10000 --out traj.extxyz

or from Python:

    import ase.io, mpnn
    from mpnn.md import run_md

    run = run_md(mpnn.load("RUN/model"), ase.io.read("cu.xyz"), ensemble="nvt",
                 temperature=600, timestep=2.0, steps=10_000, trajectory="traj.extxyz")
    run.log[-1]        # {"step", "time_fs", "T_K", "E_pot_eV", "E_kin_eV", "E_tot_eV", ...}
    run.atoms          # final structure (positions, momenta, cell in the input frame)

Units: Å, eV, amu, so one internal time unit is ase.units.fs⁻¹ fs ≈ 10.18 fs; timestep
and thermostat/barostat times are given in fs, pressure in bar, temperature in K.

Ensembles (jax-md integrators, all velocity-Verlet based):
  nve  simulate.nve
  nvt  simulate.nvt_nose_hoover (Nose-Hoover chain, tau_t)
  npt  simulate.npt_nose_hoover (isotropic cell fluctuations, tau_t and tau_p; periodic only)

Steps run on device in chunks (`lax.while_loop` inside one jitted function) between log
lines. The neighbor list is updated before every step; if it overflows (or no longer
fits the box) the chunk stops *before* applying that step, the list is reallocated on
the host from the last good state, and the step is redone: overflow is never ignored.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import ase
import ase.io
import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from ase.calculators.singlepoint import SinglePointCalculator

from mpnn.potential import CountedJit, Potential

ENSEMBLES = ("nve", "nvt", "npt")
MAX_REALLOCATIONS = 100


@dataclass
class MDRun:
    """Result of `run_md`: the log rows, the final structure and timing."""

    log: list[dict]
    atoms: ase.Atoms
    n_reallocations: int = 0
    n_compiles: int = 0  # compilations of the MD chunk (one per neighbor-list capacity)
    compile_s: float = 0.0  # calls that traced + compiled (the first, and any after a reallocation)
    run_s: float = 0.0  # all other calls
    steps_per_s: float = float("nan")  # steps in run_s / run_s
    extra: dict = field(default_factory=dict)


def _log_columns(ensemble: str) -> list[str]:
    columns = ["step", "time_fs", "T_K", "E_pot_eV", "E_kin_eV", "E_tot_eV"]
    if ensemble in ("nvt", "npt"):
        columns.append("E_cons_eV")  # the thermostat's/barostat's conserved quantity
    if ensemble == "npt":
        columns += ["volume_A3", "pressure_bar"]
    return columns


def run_md(
    potential: Potential,
    atoms: ase.Atoms,
    ensemble: str = "nvt",
    temperature: float = 300.0,
    timestep: float = 1.0,
    steps: int = 1000,
    pressure: float = 1.0,
    tau_t: float = 100.0,
    tau_p: float = 1000.0,
    seed: int = 0,
    log_every: int = 10,
    write_every: int = 100,
    trajectory: str | Path | None = None,
    log_file: str | Path | None = None,
    progress: bool = True,
    dr_threshold: float = 0.0,
    capacity_multiplier: float = 1.25,
    init_velocities: str = "auto",
) -> MDRun:
    """Run NVE/NVT/NPT MD of `atoms` with `potential` through jax-md.

    temperature (K): NVT/NPT target, and Maxwell–Boltzmann initial velocities (also for
    NVE) unless `atoms` carries momenta (init_velocities="auto"; "maxwell" always draws,
    "atoms" always keeps them). timestep, tau_t, tau_p in fs; pressure in bar.
    Writes `trajectory` (extxyz, every `write_every` steps, with energy and forces) and
    `log_file` (whitespace table every `log_every` steps) when given.
    """
    with warnings.catch_warnings():
        # jax-md's high-precision sums ask for float64 even when x64 is off; harmless.
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
        return _run_md(**locals())


def _run_md(
    potential, atoms, ensemble, temperature, timestep, steps, pressure, tau_t, tau_p, seed, log_every,
    write_every, trajectory, log_file, progress, dr_threshold, capacity_multiplier, init_velocities,
) -> MDRun:
    from jax_md import quantity, simulate

    from mpnn.calculators import jaxmd as J

    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if steps < 0 or log_every < 1 or write_every < 1:
        raise ValueError("steps must be >= 0, log_every and write_every >= 1")
    if timestep <= 0:
        raise ValueError(f"timestep must be positive (fs), got {timestep}")
    if ensemble in ("nvt", "npt") and temperature <= 0:
        raise ValueError(f"{ensemble} needs a positive temperature, got {temperature} K")
    dtype = potential.np_dtype
    # Real coordinates: jax-md 0.2.29's NPT step is wrong for fractional ones (see mpnn.calculators.jaxmd).
    system = J.system_from_atoms(atoms, fractional_coordinates=False, dtype=dtype)
    periodic = system.box is not None
    if ensemble == "npt" and not periodic:
        raise ValueError("npt needs a periodic cell (atoms.pbc all True)")

    energy = J.energy_fn(
        potential, system.displacement_fn, system.numbers, fractional_coordinates=system.fractional,
        box=system.box, total_charge=float(atoms.info.get("charge", 0.0)),
    )
    nbr_fns = J.neighbor_list(
        potential, system.displacement_fn, system.box, fractional_coordinates=system.fractional,
        dr_threshold=dr_threshold, capacity_multiplier=capacity_multiplier,
    )
    kT = units.kB * temperature
    dt = timestep * units.fs
    masses = jnp.asarray(system.masses, dtype)
    n_atom = len(atoms)

    momenta = None
    has_momenta = atoms.has("momenta") and np.any(atoms.get_momenta() != 0)
    if init_velocities == "atoms" or (init_velocities == "auto" and has_momenta):
        momenta = jnp.asarray(atoms.get_momenta() @ system.rotation.T, dtype)
    elif init_velocities not in ("auto", "maxwell"):
        raise ValueError(f"init_velocities must be 'auto', 'maxwell' or 'atoms', got {init_velocities!r}")

    R = system.positions
    nbrs = nbr_fns.allocate(R)
    key = jax.random.PRNGKey(seed)
    if ensemble == "nve":
        init_fn, apply_fn = simulate.nve(energy, system.shift_fn, dt)
        state = init_fn(key, R, kT, mass=masses, momenta=momenta, neighbor=nbrs)
    elif ensemble == "nvt":
        init_fn, apply_fn = simulate.nvt_nose_hoover(energy, system.shift_fn, dt, kT, tau=tau_t * units.fs)
        state = init_fn(key, R, mass=masses, momenta=momenta, neighbor=nbrs)
    else:
        init_fn, apply_fn = simulate.npt_nose_hoover(
            energy, system.shift_fn, dt, pressure * units.bar, kT,
            barostat_kwargs={"tau": tau_p * units.fs}, thermostat_kwargs={"tau": tau_t * units.fs},
        )
        # jax-md's npt init_fn is not jitted: run eagerly it compiles every op on its own (~30 s).
        state = jax.jit(init_fn)(key, R, system.box, mass=masses, momenta=momenta, neighbor=nbrs)

    def box_kwargs(state):
        return {"box": simulate.npt_box(state)} if ensemble == "npt" else {}

    def observe(state, nbrs):
        """Log quantities at the current state (list rebuilt at the current positions)."""
        nbrs = nbrs.update(state.position, **box_kwargs(state))
        e_pot = energy(state.position, neighbor=nbrs, **box_kwargs(state))
        e_kin = simulate.kinetic_energy(state)
        out = {"E_pot_eV": e_pot, "E_kin_eV": e_kin, "bad": J.overflowed(nbrs), "box": box_kwargs(state).get("box")}
        fixed = lambda R, **kw: e_pot  # the invariants only need E_pot, already computed
        if ensemble == "nvt":
            out["E_cons_eV"] = simulate.nvt_nose_hoover_invariant(fixed, state, kT)
        elif ensemble == "npt":
            box = simulate.npt_box(state)
            out["E_cons_eV"] = simulate.npt_nose_hoover_invariant(fixed, state, pressure * units.bar, kT)
            out["volume_A3"] = quantity.volume(3, box)
            out["pressure_bar"] = quantity.pressure(energy, state.position, box, e_kin, neighbor=nbrs) / units.bar
        return out

    def run_chunk(state, nbrs, n_steps):
        """Up to n_steps steps; stops before a step whose neighbor list overflowed."""

        def cond(carry):
            _, _, done, bad = carry
            return (done < n_steps) & ~bad

        def body(carry):
            state, nbrs, done, _ = carry
            nbrs = nbrs.update(state.position, **box_kwargs(state))
            bad = J.overflowed(nbrs)
            # (npt's apply_fn computes its own box from the state and passes it on)
            state = jax.lax.cond(bad, lambda s: s, lambda s: apply_fn(s, neighbor=nbrs), state)
            return state, nbrs, done + jnp.where(bad, 0, 1), bad

        state, nbrs, done, bad = jax.lax.while_loop(cond, body, (state, nbrs, jnp.int32(0), jnp.bool_(False)))
        return state, nbrs, done, bad, observe(state, nbrs)

    run_chunk = CountedJit(run_chunk)
    columns = _log_columns(ensemble)
    log_rows: list[dict] = []
    log_handle = None
    if log_file is not None:
        log_handle = open(log_file, "w")
        log_handle.write("# " + " ".join(columns) + "\n")
    if trajectory is not None:
        Path(trajectory).unlink(missing_ok=True)

    def to_atoms(state, obs, step) -> ase.Atoms:
        box = np.asarray(obs["box"]) if ensemble == "npt" else system.box
        out = ase.Atoms(
            numbers=system.numbers,
            positions=system.real_positions(state.position, box),
            cell=system.cell(box) if periodic else None,
            pbc=bool(periodic),
            momenta=system.to_original_frame(state.momentum),
            masses=system.masses,
        )
        out.calc = SinglePointCalculator(out, energy=float(obs["E_pot_eV"]), forces=system.to_original_frame(state.force))
        out.info["step"] = int(step)
        out.info["time_fs"] = float(step * timestep)
        return out

    def record(state, obs, step):
        e_pot, e_kin = float(obs["E_pot_eV"]), float(obs["E_kin_eV"])
        if not (math.isfinite(e_pot) and math.isfinite(e_kin)):
            raise FloatingPointError(f"step {step}: energy is {e_pot} eV, kinetic {e_kin} eV (unstable MD: lower the timestep)")
        row = {
            "step": int(step),
            "time_fs": step * timestep,
            "T_K": 2.0 * e_kin / (3 * n_atom * units.kB),
            "E_pot_eV": e_pot,
            "E_kin_eV": e_kin,
            "E_tot_eV": e_pot + e_kin,
        }
        for key in columns[6:]:
            row[key] = float(obs[key])
        log_rows.append(row)
        if log_handle is not None:
            log_handle.write(" ".join(f"{row[c]:.10g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + "\n")
            log_handle.flush()
        if trajectory is not None and step % write_every == 0:
            ase.io.write(trajectory, to_atoms(state, obs, step), format="extxyz", append=True)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"md {ensemble}", unit="step", file=sys.stderr)

    interval = math.gcd(log_every, write_every)
    step = 0
    n_realloc = 0
    compile_s, run_s, run_steps = 0.0, 0.0, 0
    try:
        # Step 0: the initial state.
        start = time.perf_counter()
        state, nbrs, _, bad, obs = run_chunk(state, nbrs, jnp.int32(0))
        compile_s = time.perf_counter() - start
        if bool(bad):
            nbrs = nbr_fns.allocate(state.position, math.ceil(0.25 * nbrs.max_occupancy / n_atom), **box_kwargs(state))
            n_realloc += 1
            state, nbrs, _, bad, obs = run_chunk(state, nbrs, jnp.int32(0))
        record(state, obs, 0)
        while step < steps:
            target = min(steps, (step // interval + 1) * interval)
            start, traces = time.perf_counter(), run_chunk.n_compiles
            state, nbrs, done, bad, obs = run_chunk(state, nbrs, jnp.int32(target - step))
            done, bad = int(done), bool(bad)
            if run_chunk.n_compiles != traces:  # recompiled (new list capacity): not a timing sample
                compile_s += time.perf_counter() - start
            else:
                run_s += time.perf_counter() - start
                run_steps += done
            step += done
            if bar is not None:
                bar.update(done)
            if bad or step < target:
                # Overflow (or a box that outgrew its list): reallocate from the last good state, redo.
                n_realloc += 1
                if n_realloc > MAX_REALLOCATIONS:
                    raise RuntimeError(f"neighbor list reallocated {n_realloc} times by step {step}; check the structure")
                # Grow by at least 25% so that a slowly rising pair count costs few recompilations.
                extra = math.ceil(0.25 * nbrs.max_occupancy / n_atom)
                nbrs = nbr_fns.allocate(state.position, extra, **box_kwargs(state))
                if J.needs_reallocation(nbrs):
                    raise RuntimeError(f"step {step}: a freshly allocated neighbor list reports an error ({nbrs.error if hasattr(nbrs, 'error') else 'overflow'})")
                continue
            if step % log_every == 0 or step % write_every == 0 or step == steps:
                record(state, obs, step)
                if bar is not None:
                    last = log_rows[-1]
                    bar.set_postfix(T=f"{last['T_K']:.0f}K", E_tot=f"{last['E_tot_eV']:.4f}")
    finally:
        if bar is not None:
            bar.close()
        if log_handle is not None:
            log_handle.close()

    final = to_atoms(state, obs, step)
    return MDRun(
        log=log_rows,
        atoms=final,
        n_reallocations=n_realloc,
        n_compiles=run_chunk.n_compiles,
        compile_s=compile_s,
        run_s=run_s,
        steps_per_s=run_steps / run_s if run_s > 0 else float("nan"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpnn.md",
        description="Molecular dynamics with a trained potential (jax-md): NVE, NVT (Nose-Hoover chain) or NPT.",
    )
    parser.add_argument("--model", required=True, help="saved model folder (RUN/model)")
    parser.add_argument("--structure", required=True, help="starting structure, any format ase.io.read knows")
    parser.add_argument("--index", default="-1", help="frame of --structure to start from (default: last)")
    parser.add_argument("--repeat", default=None, help="build a supercell first, e.g. 3,3,3")
    parser.add_argument("--ensemble", choices=ENSEMBLES, default="nvt")
    parser.add_argument("--temperature", type=float, default=300.0, help="K (target, and initial velocities)")
    parser.add_argument("--pressure", type=float, default=1.0, help="bar (npt)")
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--tau-t", type=float, default=100.0, help="thermostat time (fs)")
    parser.add_argument("--tau-p", type=float, default=1000.0, help="barostat time (fs)")
    parser.add_argument("--out", default="traj.extxyz", help="trajectory (extxyz)")
    parser.add_argument("--log", default=None, help="log table (default: OUT with suffix .log)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--write-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default: the model's")
    parser.add_argument("--init-velocities", choices=("auto", "maxwell", "atoms"), default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from mpnn.host_memory import keep_freed_memory

    keep_freed_memory()  # before the first computation: this entry point owns its process

    from mpnn.saved_model import load_model

    potential = load_model(args.model, dtype=args.dtype, set_precision=True)
    index = int(args.index) if args.index.lstrip("-").isdigit() else args.index
    atoms = ase.io.read(args.structure, index=index)
    if args.repeat:
        atoms = atoms.repeat(tuple(int(x) for x in args.repeat.split(",")))
    log_path = args.log or str(Path(args.out).with_suffix(".log"))
    print(
        f"{len(atoms)} atoms, {args.ensemble} at {args.temperature} K"
        + (f", {args.pressure} bar" if args.ensemble == "npt" else "")
        + f", {args.steps} steps of {args.timestep} fs → {args.out}, log {log_path}",
        file=sys.stderr,
    )
    run = run_md(
        potential, atoms, ensemble=args.ensemble, temperature=args.temperature, timestep=args.timestep,
        steps=args.steps, pressure=args.pressure, tau_t=args.tau_t, tau_p=args.tau_p, seed=args.seed,
        log_every=args.log_every, write_every=args.write_every, trajectory=args.out, log_file=log_path,
        progress=not args.no_progress, init_velocities=args.init_velocities,
    )
    last = run.log[-1]
    print(
        f"done: {last['step']} steps, T {last['T_K']:.1f} K, E_tot {last['E_tot_eV']:.6f} eV; "
        f"compile {run.compile_s:.1f} s, {run.steps_per_s:.1f} steps/s "
        f"({1e6 / (run.steps_per_s * len(atoms)) if run.steps_per_s > 0 else float('nan'):.2f} µs/atom/step), "
        f"{run.n_reallocations} neighbor-list reallocations",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
