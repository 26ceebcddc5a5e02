"""Running an experiment: its jobs (:mod:`.jobs`), resume from checkpoints (:mod:`.resume`),
the one orchestration path of single runs and sweeps (:mod:`.experiment`) and its report
(:mod:`.report`)."""
