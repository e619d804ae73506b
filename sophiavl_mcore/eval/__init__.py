"""Benchmark evaluation without a model: reading benchmark files (``samples``, ``tsv``),
answer extraction (``extract``), deterministic scorers (``scorers``), aggregates
(``aggregate``) and the benchmark registry (``registry``). A runner feeds the prompts of
:class:`~sophiavl_mcore.eval.registry.Benchmark` to the rollout engines and scores the
replies with it."""
