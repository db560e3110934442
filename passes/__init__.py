"""Rewrite passes over the layer graph (installed as kimi_graph.passes)."""
