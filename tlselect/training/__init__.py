"""The training step of the DAG: the trainer and its models, execution plans measured per device,
GPU slots, the fork server that starts each job, the per-layer feature cache, the speedups benchmark."""
