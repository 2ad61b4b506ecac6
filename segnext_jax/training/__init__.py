"""Training maths of the reference recipe: optimiser groups, learning-rate schedule and loss."""
