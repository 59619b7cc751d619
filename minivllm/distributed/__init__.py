"""Tensor parallelism: one model split over several ranks (processes), through ``torch.distributed``.

* :mod:`~minivllm.distributed.sharding`: which slice of every weight a rank keeps (read its docstring first);
* :mod:`~minivllm.distributed.group`: the process group and the two collectives the model uses;
* :mod:`~minivllm.distributed.model`: the sharded model (row-parallel projections, vocab-parallel embedding and head);
* :mod:`~minivllm.distributed.executor` / :mod:`~minivllm.distributed.worker`: rank 0 (the engine's process) starts
  one worker process per other rank and sends each the step's plan; every rank runs the forward pass.
"""
