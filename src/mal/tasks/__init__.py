"""Tasks over an encoder's features, each with its loss, metrics and evaluator, shared by pretraining (the dense
losses of multi-task pretraining) and fine-tuning: :mod:`~mal.tasks.classification`,
:mod:`~mal.tasks.segmentation`, :mod:`~mal.tasks.depth`, and :mod:`~mal.tasks.dense` (the dense model, inference
and evaluator that segmentation and depth share)."""
