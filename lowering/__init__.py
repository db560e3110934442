"""Lowerings of the layer graph to targets (installed as kimi_graph.lowering)."""
