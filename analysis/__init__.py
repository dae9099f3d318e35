"""Pure math on numpy/torch arrays: no Ray, no I/O."""
