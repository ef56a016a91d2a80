"""Persona Feedback Learning worker: learns per-module confidence from feedback and audits."""
