"""The mlir target: the IR after the pass pipeline as torch code per op (lowering.py,
torch_*.py), exported by torch.export (emit_torch.py) and torch-mlir (export.py) to an MLIR
dialect, compiled by IREE (iree.py) for llvm-cpu and run by mocompile.runtime_iree;
backend.py is the Backend the compiler sees. Needs the `mlir` extra (torch-mlir, IREE)."""
