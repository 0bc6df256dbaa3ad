"""One module per notebook (phases layer): :mod:`.finetune` (02), :mod:`.inference` (03),
:mod:`.pruning` (04), :mod:`.ranking` (05), and the measured evaluation they share
(:mod:`.evaluation`). The data phase (01) reads :mod:`llm_energy.data.tasks` directly."""
