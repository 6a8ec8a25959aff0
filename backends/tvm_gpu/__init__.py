"""The GPU targets (`opencl`, `cuda`): the shared TVM lowering with GPU kernels, device code from
TVM's code generators, and a launch plan that mocompile.runtime_gpu replays (see README.md)."""
