"""Pictures: of a network (filters, activations, CroW weights, dense maps) and of a search (grids)."""
