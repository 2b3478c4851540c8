"""The training job behind ``launch/train.py``, cut into small composable parts.

``schedule`` (lr schedule, batch-scaling rule, clipping window), ``sampler`` (step-indexed,
resumable batches), ``build`` (param groups, model, data, engine), ``loop`` (the job),
``checkpoint``, ``metrics``, ``evaluate``, ``plot`` and ``distributed`` (process group,
test-only fault injection).
"""
