"""SophiaVL-R1 data: records (``records``), prompts (``prompts``), the DALI image path
(``images``, ``image_stream``) and synthetic test inputs (``synthetic``).

Typed configs owned here, composed by the job configs (``trainer.setup.GRPOTrainConfig``,
``trm_train.TRMTrainConfig``): ``records.DataConfig`` (with ``records.DataSourceConfig``),
``prompts.PromptConfig``, ``images.ImageConfig``.
"""
