"""What the TVM-based targets share: an IR graph lowered to Relax once (lower.py, lowerings.py),
weight layouts, the call plan, and the KernelSet through which each target supplies its kernels
and schedules (see README.md)."""
