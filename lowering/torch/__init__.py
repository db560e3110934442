"""Lowering to torch: the layer graph as a `torch.fx.GraphModule` whose fused and
data-dependent ops are `torch.library` custom ops (`torch.ops.kimi_graph.*`).

- `lower(g, weights)`: the GraphModule (`fx.py`); the op table is `ops.LOWERING`.
- `functional.<kind>(*operands, **attrs)`: every op as a function (the custom op or a traced
  function); modules written with them compile with the "kimi_graph" backend.
- `set_impl(kind, device_type, fn)`: the one registration point for kernels (`custom_ops.py`).
- `import_fx(gm, example_inputs)`: an FX graph of our ops back to the layer graph (`importer.py`).
- the torch.compile backend "kimi_graph" and the `backend="torch"` executor (`backend.py`).
"""
from .backend import register
from .custom_ops import define_all, set_impl
from .fx import KimiGraphModule, lower
from .importer import import_fx
from .ops import define_functional, functional

define_all()
define_functional()
register()

__all__ = ["lower", "set_impl", "import_fx", "functional", "KimiGraphModule"]
