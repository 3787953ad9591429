"""The benchmark harness: the quality grid behind ``lockedopd bench quality`` (:mod:`lockedopd.bench.quality`), its
statistics, reports and the archive a grid keeps its finished cells in. Nothing here is imported by
``import lockedopd``."""
