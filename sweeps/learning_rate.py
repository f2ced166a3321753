"""Two learning rates for the tiny model (the README's sweep example)."""


def get_sweep():
  return {"grid": {"optim.learning_rate": [1e-3, 3e-3]}}
