"""Expert-parallel execution of an artifact over torch.distributed (`mocompile run-ep`).

`transport` moves rows between ranks with all-to-all (gloo on CPUs, NCCL where the ranks
have GPUs), `worker` is one rank's process (also what `torchrun -m mocompile.distributed.worker`
starts), `launcher` starts the ranks and stops them all when one fails. This layer imports
torch.distributed and the runtime (runtime_ep.py does the expert parallelism itself), never
the compiler.
"""

PEER_FAILURE = "another rank exited or did not answer"  # in a rank's error when an exchange with the others failed
