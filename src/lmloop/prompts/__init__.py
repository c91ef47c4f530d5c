"""Prompts as artefacts: versioned Jinja templates, few-shot selection, label-constrained scoring."""
