"""One module per op: Gram matrices, small eigensolves, r x r projections, lift."""
