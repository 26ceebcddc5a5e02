"""Training: the table of methods (:mod:`.methods`), data on device (:mod:`.device`), the pure
steps (:mod:`.steps`, :mod:`.consolidation`), their runners for one run or a vmapped sweep
(:mod:`.runners`), and the one loop over tasks (:mod:`.loop`) that stops at safe points on a
signal (:mod:`.signals`)."""
