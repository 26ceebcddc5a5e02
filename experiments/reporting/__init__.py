"""Reporting: continual-learning metrics (:mod:`.metrics`), run records and ``results.json``
(:mod:`.results`), sweep summaries (:mod:`.sweeps`), figures (:mod:`.plots`) and the table of a
long sequence (:mod:`.sequence_report`)."""
