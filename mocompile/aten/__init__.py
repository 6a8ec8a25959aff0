"""Batch isolation of plain torch modules through torch.export and the Core ATen op set.

`check_module` captures a module with its batch dimension symbolic (`capture`), runs the
abstract interpretation of `mocompile.isolation` over the ATen graph with a batch-flow rule
for every Core ATen op (`registry`, `rules/`), and backs every verdict that is not a proof
with a differential run of the exported program (`witness`). The report is the IR path's
`IsolationReport`. `mocompile.isolation_check.check_isolation` sends a module here when the
MoE lowering to the IR does not understand it.
"""
