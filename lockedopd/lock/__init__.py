"""The lock: which weights train (:mod:`~lockedopd.lock.params`), what entering and leaving the locked phase does
(:mod:`~lockedopd.lock.phases`), and the controller that decides when, inside the OPD loop
(:mod:`~lockedopd.lock.controller`)."""
