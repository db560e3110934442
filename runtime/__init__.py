"""Engines that run a lowered model (installed as kimi_graph.runtime)."""
