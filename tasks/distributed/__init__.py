"""Training on several processes (torchrun): ddp.py (ranks, data shards, DDP, the collectives
the loop calls) and sharding.py (train.strategy, FSDP2), which builds on ddp.py."""
