"""Model access: architectures (specs), loading, hooks, forward from a block, read views, weight state."""
