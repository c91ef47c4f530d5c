"""Responsible evaluation: counterfactual bias, memorization and membership audits that can gate a promotion."""
