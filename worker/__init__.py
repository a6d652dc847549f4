"""Celery app, thin tasks, and the pipeline that glues service and models."""
