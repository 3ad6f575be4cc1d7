"""Training methods behind one interface: prefix-tuning, the paper's baselines, multi-task
prefixes, the objective, and the registry that knows them all."""
