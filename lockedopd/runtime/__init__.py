"""Runtime plumbing the method runs on: processes and FSDP2, atomic files and checkpoints, bitsandbytes, vLLM's
start-up, the host allocator, activation checkpointing and figure writing. Nothing here knows about subspaces."""
