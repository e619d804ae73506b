"""SophiaVL-R1 data: records (``records``), prompts (``prompts``), the DALI image path
(``images``, ``image_stream``) and synthetic test inputs (``synthetic``).

Typed configs owned here, for ``config.Config`` to compose: ``records.DataConfig``
(with ``records.DataSourceConfig``), ``prompts.PromptConfig``, ``images.ImageConfig``.
"""
