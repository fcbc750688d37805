"""Training runs: configuration, the loop, learners (FGD runtime, backprop baseline), data, checkpoints,
metrics, freezing, learning-rate sweeps, pretraining and the artifact cache."""
