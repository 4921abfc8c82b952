"""``deepfeat serve``: a feature store behind an HTTP API and a web page (extra ``[serve]``).

See :mod:`deepfeat.serve.app` for the endpoints and ``docs/serve.md`` for how to run it.
"""

from __future__ import annotations

from deepfeat.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
