"""The data plane: auth, endpoint lookup, traffic split, replica choice and forwarding."""
