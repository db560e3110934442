"""MLIR through torch-mlir (optional extra `mlir`): `export_mlir(g, weights, dialect)` and
`parse_mlir(text)` in `export.py`; torch_mlir is imported only when they run."""
