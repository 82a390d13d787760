"""The optimizer axis's shared mechanics that a step decides from what it is given (see `plan`)."""
