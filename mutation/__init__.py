"""Mutation testing (scripts/mutation): mutmut over the pure worker modules, and a driver that
applies SQL mutants one at a time to a fresh database and runs pgTAP and integration tests.

A mutant that survives is a behaviour change no test notices. Survivors that cannot change
behaviour (equivalent mutants) are listed with their reason in docs/mutation.md; every other
survivor fails the run.
"""
