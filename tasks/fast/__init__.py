"""The CUDA fast path of train.speed: plan.py chooses it (a frozen Plan, every choice a field),
patch.py installs the Plan's ops on a model and undoes them, ops/ holds the kernels and
autograd functions (no model surgery there)."""
