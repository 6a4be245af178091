"""The trainer: train state, the jitted step, the loop, and the task-weight optimiser."""
