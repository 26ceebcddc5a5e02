"""Storage: checkpoints that resume a run bit for bit (:mod:`.checkpoint`) and the workdir's
lock, checks and atomic writes (:mod:`.workdir`)."""
