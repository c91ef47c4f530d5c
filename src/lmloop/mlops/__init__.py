"""MLOps: tracking now; registry, monitoring and the feedback loop build on it."""
