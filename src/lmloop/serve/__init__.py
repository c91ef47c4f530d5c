"""Deployment: the HTTP server (FastAPI on uvicorn) with micro-batching and a prediction log."""
