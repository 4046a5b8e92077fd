"""Search: solvers that choose each layer's format under a budget, all behind one interface."""
