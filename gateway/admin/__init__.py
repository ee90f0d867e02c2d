"""The admin API and dashboard under ``/admin`` (see docs/operations.md).

One concern per module: ``auth`` (bearer token), ``routes`` (HTTP handlers),
``publish`` (seeding from uploads and entry edits, one at a time), ``misses``
(grouping missed questions), ``static/dashboard.html`` (the page).
"""

from .routes import admin_exception_handlers, admin_routes

__all__ = ["admin_exception_handlers", "admin_routes"]
