"""SophiaVL-R1 data: records (``records``), prompts (``prompts``), the DALI image path
(``images``, ``patchify``, ``image_stream``) and synthetic test inputs (``synthetic``).
Typed configs owned here live in ``config`` (``DataConfig`` with ``DataSourceConfig``,
``VisualTaskConfig``, ``PromptConfig``, ``ImageConfig``), composed by the job configs in
``trainer.config`` (``GRPOTrainConfig``, ``TRMTrainConfig``).
"""
