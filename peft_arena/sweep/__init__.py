"""Arena sweeps: the plan (chains and config hashes), one process per chain, parallel slots and GPUs."""
