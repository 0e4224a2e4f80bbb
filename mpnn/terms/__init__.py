"""Energy terms added to the learned local model: pair repulsion (ZBL), later electrostatics."""
