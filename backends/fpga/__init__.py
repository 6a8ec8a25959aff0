"""The FPGA target (`--target fpga`): a fixed-point dataflow design of the model as a Vitis HLS
C++ project, C-simulated here with g++ and checked bit for bit against a numpy emulation of
the same fixed-point arithmetic, with resource and latency estimates against a device's
budget. backend.py is what the compiler sees; see README.md in the repository for the parts.
"""
