"""Adapters of `benchmarks/speed.py`: one module per implementation, each with

    build(model: "mace" | "nequip", hyper: dict, structures: list[ase.Atoms]) -> bench

`hyper` is `speed.HYPER` (or `speed.PAPER`); `structures` are the workload (to pick the
elements and the average number of neighbors). The bench object has

    n_params: int                   trainable parameters
    note: str                       what differs from the requested hyperparameters, if anything
    energy_forces(structures) -> fn one batch: energy, forces (+ stress for periodic cells)
    train_step(structures) -> fn    one optimiser step (Adam) of an energy + forces loss on the
                                    labels atoms.info["energy"], atoms.arrays["forces"]
    md(atoms, steps) -> fn          `steps` NVE velocity-Verlet steps (1 fs) from 300 K

Each fn takes no argument and returns only after the work is done (block_until_ready);
everything that can be prepared once (graphs, neighbor lists, optimiser state) is
prepared before fn is returned. A capability an implementation lacks raises
NotImplementedError (the table shows "–").
"""
